"""Inference services: standing bids for replicas of one program, near their users.

A service's replicas are jobs (``Job.service_id``): each is matched, run, metered
and billed as any job is, but runs until the service lets it go. The service
holds what the replicas share (the program, where its users are, the SLO, the
replica bounds and the price), how many replicas it wants now, and why.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from broker.db import Base, UtcDateTime, utcnow
from broker.types import StrList


class ServiceState(enum.StrEnum):
    deploying = "deploying"  # no replica has answered yet
    serving = "serving"  # at least one replica has come up
    failed = "failed"  # its replicas kept failing before serving (``error`` says why)
    undeployed = "undeployed"  # its owner took it down; its replicas were let go


LIVE_STATES = frozenset({ServiceState.deploying, ServiceState.serving})


class Service(Base):
    __tablename__ = "services"
    __table_args__ = (
        CheckConstraint("min_replicas >= 1", name="min_replicas_positive"),
        CheckConstraint("max_replicas >= min_replicas", name="max_not_below_min"),
        CheckConstraint("latency_slo_ms > 0", name="slo_positive"),
        Index("ix_services_account_created", "account_id", "created_at"),
        Index("ix_services_state", "state"),
        UniqueConstraint("account_id", "idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    state: Mapped[ServiceState] = mapped_column(
        Enum(ServiceState, name="service_state", native_enum=False, length=16),
        default=ServiceState.deploying,
    )
    artifact_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    # The example inputs it was packaged with: each replica compiles and checks on them.
    inputs_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    platforms: Mapped[list[str]] = mapped_column(StrList)
    # Where its requests come from: [{"name", "lat", "lon", "share"}], shares summing to 1.
    users: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    latency_slo_ms: Mapped[float] = mapped_column(Float)
    min_replicas: Mapped[int] = mapped_column(Integer)
    max_replicas: Mapped[int] = mapped_column(Integer)
    # What the autoscaler wants now, within min and max (placement may want more, to
    # bring every user region within the SLO).
    desired_replicas: Mapped[int] = mapped_column(Integer)
    max_price_per_hour_micros: Mapped[int] = mapped_column(BigInteger)
    allowed_countries: Mapped[list[str]] = mapped_column(StrList, default=list)
    # Scale up when requests waiting per replica, or the 95th percentile of time in a
    # replica, pass these for a while (broker.services.scaling).
    target_queue: Mapped[float] = mapped_column(Float, default=2.0)
    target_p95_ms: Mapped[float | None] = mapped_column(Float, default=None)
    # The user regions no allowed offer can serve within the SLO, and why (None: all).
    placement_note: Mapped[str | None] = mapped_column(Text, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    # A retried POST with the same key returns this service; the hash spots a reused key.
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    undeployed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None)


class ServiceEvent(Base):
    """A change to a service's replicas and its reason: placed, scaled, lost, failed."""

    __tablename__ = "service_events"
    __table_args__ = (Index("ix_service_events_service_at", "service_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    service_id: Mapped[str] = mapped_column(ForeignKey("services.id"))
    at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(24))  # scale_up, scale_down, replica_lost, ...
    replicas_from: Mapped[int] = mapped_column(Integer)
    replicas_to: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)


class ServiceWindow(Base):
    """What the relay measured of a service over a few seconds, for one scope: the
    whole service ("service"), one replica ("replica:<allocation id>") or one user
    region ("region:<index>"). Latency is the caller's, through the broker; the
    replica's own time is ``replica_p95_ms``."""

    __tablename__ = "service_windows"
    __table_args__ = (Index("ix_service_windows_service_ended", "service_id", "ended_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    service_id: Mapped[str] = mapped_column(ForeignKey("services.id"))
    scope: Mapped[str] = mapped_column(String(48))
    ended_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    seconds: Mapped[float] = mapped_column(Float)
    requests: Mapped[int] = mapped_column(Integer)
    errors: Mapped[int] = mapped_column(Integer)
    retries: Mapped[int] = mapped_column(Integer, default=0)
    within_slo: Mapped[int] = mapped_column(Integer, default=0)
    p50_ms: Mapped[float | None] = mapped_column(Float, default=None)
    p95_ms: Mapped[float | None] = mapped_column(Float, default=None)
    p99_ms: Mapped[float | None] = mapped_column(Float, default=None)
    replica_p95_ms: Mapped[float | None] = mapped_column(Float, default=None)
    queue_mean: Mapped[float] = mapped_column(Float, default=0.0)
    queue_max: Mapped[int] = mapped_column(Integer, default=0)
    # A replica's window: the relay holding its connection, as other brokers reach it.
    relay: Mapped[str | None] = mapped_column(String(300), default=None)
