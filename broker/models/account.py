from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import Enum, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from broker.db import Base, UtcDateTime, utcnow


class Role(enum.StrEnum):
    developer = "developer"
    provider = "provider"
    admin = "admin"


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[Role] = mapped_column(
        Enum(Role, name="account_role", native_enum=False, length=16)
    )
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None)


class ApiKey(Base):
    """An API key, stored as its SHA-256 digest; the key itself is shown once."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    # The first characters of the key, so a user can tell keys apart in listings.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # A node key: issued to a provider's agent when it registers a node, and good
    # for that node's heartbeats, offers and allocations only (see broker.auth).
    node_id: Mapped[str | None] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), default=None, index=True
    )
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None)
    # When the key last authenticated a request, to the minute or so: written at most
    # once a minute per key and process (broker.accounts.service.KEY_USE_RESOLUTION).
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None)
