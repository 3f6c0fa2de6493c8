from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from broker.db import Base, UtcDateTime, utcnow


class AllocationStatus(enum.StrEnum):
    active = "active"  # the job holds the accelerators
    released = "released"  # cancelled, or handed back before it ran
    finished = "finished"  # the job ended (succeeded or failed)


class Allocation(Base):
    """A match: a job holds ``accelerators`` of an offer at the ask locked when it cleared.

    The estimated cost is exact, in micro-dollars: each part (compute, egress,
    latency) is rounded half-even to the micro-dollar, and the total is their sum.
    """

    __tablename__ = "allocations"
    __table_args__ = (
        # A job holds at most one active allocation: never assigned twice.
        Index(
            "uq_allocations_active_job",
            "job_id",
            unique=True,
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ),
        Index("ix_allocations_offer_status", "offer_id", "status"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    offer_id: Mapped[str] = mapped_column(ForeignKey("offers.id"))
    round_id: Mapped[str | None] = mapped_column(ForeignKey("clearing_rounds.id"), default=None)
    status: Mapped[AllocationStatus] = mapped_column(
        Enum(AllocationStatus, name="allocation_status", native_enum=False, length=16),
        default=AllocationStatus.active,
    )
    accelerators: Mapped[int] = mapped_column(Integer)
    # Fractional jobs: the part of one accelerator it was given ("3g.40gb@4": a MIG
    # instance; "2/8 shared on GPU 1": shares of the offer's accelerator 1) and that
    # part exactly, share_num / share_den of one accelerator, what it is billed at
    # (1 / 1: whole accelerators).
    slice: Mapped[str | None] = mapped_column(String(40), default=None)
    share_num: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    share_den: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    price_per_hour_micros: Mapped[int] = mapped_column(BigInteger)
    runtime_hours: Mapped[float] = mapped_column(Float)
    # Of runtime_hours, the seconds of start-up the estimate included (docs/market.md).
    startup_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # The match's estimated energy at the wall and emissions (docs/market.md).
    energy_kwh: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    gco2: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # What the run really used, when its agent measured it: the devices' energy times
    # the site's PUE, and that times the grid's intensity; None: not measured.
    measured_kwh: Mapped[float | None] = mapped_column(Float, default=None)
    measured_gco2: Mapped[float | None] = mapped_column(Float, default=None)
    rtt_ms: Mapped[float] = mapped_column(Float)
    compute_micros: Mapped[int] = mapped_column(BigInteger)
    egress_micros: Mapped[int] = mapped_column(BigInteger)
    latency_micros: Mapped[int] = mapped_column(BigInteger)
    cost_micros: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # When the provider started the job, and the accelerator-milliseconds it has
    # reported since: at most wall time x accelerators, and a replayed report
    # counts once (reports carry the running total, not increments).
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None)
    usage_ms: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The broker's fee in force when the round matched the job, in parts per
    # million of the usage charge (broker.billing.amounts): locked, like the ask.
    fee_ppm: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None)
    end_reason: Mapped[str | None] = mapped_column(Text, default=None)


class ClearingRound(Base):
    """One clearing round: what it considered, what it matched, how good the answer was."""

    __tablename__ = "clearing_rounds"
    __table_args__ = (Index("ix_clearing_rounds_started", "started_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    trigger: Mapped[str] = mapped_column(String(16))  # auto or manual
    status: Mapped[str] = mapped_column(String(16))  # running, OPTIMAL, FEASIBLE, failed
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None)
    jobs_considered: Mapped[int] = mapped_column(Integer, default=0)
    offers_considered: Mapped[int] = mapped_column(Integer, default=0)
    matched: Mapped[int] = mapped_column(Integer, default=0)
    stale: Mapped[int] = mapped_column(Integer, default=0)
    objective: Mapped[float | None] = mapped_column(Float, default=None)
    bound: Mapped[float | None] = mapped_column(Float, default=None)
    gap: Mapped[float | None] = mapped_column(Float, default=None)
    solve_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
