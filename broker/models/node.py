from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Enum, Float, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from broker.db import Base, UtcDateTime, utcnow


class NodeStatus(enum.StrEnum):
    online = "online"  # heartbeats arrive; its offers are on the book
    offline = "offline"  # heartbeats stopped; offers withdrawn, its jobs handed back
    stopped = "stopped"  # the agent signed off


class Node(Base):
    """A provider's machine running the agent: one name per provider.

    The agent registers it, keeps it alive with heartbeats, and publishes its
    free accelerators as offers. Each registration issues a node key; the key of
    an earlier registration stops working, so one machine is one agent.
    """

    __tablename__ = "nodes"
    __table_args__ = (
        UniqueConstraint("provider_id", "name"),
        Index("ix_nodes_status_heartbeat", "status", "last_heartbeat_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    provider_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    status: Mapped[NodeStatus] = mapped_column(
        Enum(NodeStatus, name="node_status", native_enum=False, length=16),
        default=NodeStatus.online,
    )
    adapters: Mapped[list[str]] = mapped_column(JSON, default=list)
    region: Mapped[str] = mapped_column(String(64))
    country: Mapped[str] = mapped_column(String(2))
    lat: Mapped[float] = mapped_column(Float)
    lon: Mapped[float] = mapped_column(Float)
    # What discovery last found, as the agent reported it (model, health, utilisation).
    devices: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    agent_version: Mapped[str | None] = mapped_column(String(64), default=None)
    status_reason: Mapped[str | None] = mapped_column(Text, default=None)
    last_heartbeat_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
