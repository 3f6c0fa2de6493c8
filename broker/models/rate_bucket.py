"""Rate-limit buckets kept in the database, so that every replica draws on the same
tokens (``broker.buckets.DatabaseBuckets``)."""

from __future__ import annotations

from sqlalchemy import Boolean, Double, String
from sqlalchemy.orm import Mapped, mapped_column

from broker.db import Base


class RateBucket(Base):
    __tablename__ = "rate_buckets"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    tokens: Mapped[float] = mapped_column(Double)
    stamp: Mapped[float] = mapped_column(Double)  # seconds since the epoch, the database's
    granted: Mapped[bool] = mapped_column(Boolean)  # whether the last request got a token
