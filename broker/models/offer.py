from __future__ import annotations

import enum
from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column

from broker.db import Base, UtcDateTime, utcnow
from broker.money import micros_to_usd
from broker.types import StrList


class OfferStatus(enum.StrEnum):
    active = "active"
    withdrawn = "withdrawn"
    # Taken off the book by the broker: it left matches unstarted too often
    # (broker.market.unstarted); ``suspended_reason`` says why.
    suspended = "suspended"


class FractionKind(enum.StrEnum):
    """What an offer sells of each accelerator (docs/market.md, fractions)."""

    whole = "whole"
    # One GPU in MIG mode: hardware-isolated instances of its model's profiles.
    mig = "mig"
    # Accelerators time-sliced into ``shares`` equal shares each, with a memory cap
    # per share; compute is not isolated.
    shared = "shared"


class Offer(Base):
    """A set of identical accelerators on one node, offered at one price (an ask)."""

    __tablename__ = "offers"
    __table_args__ = (
        CheckConstraint("count >= 0", name="count_not_negative"),
        CheckConstraint("count <= capacity", name="count_within_capacity"),
        CheckConstraint("price_per_hour_micros >= 0", name="price_not_negative"),
        CheckConstraint("shares >= 0", name="shares_not_negative"),
        CheckConstraint("shares_busy >= 0", name="shares_busy_not_negative"),
        Index("ix_offers_book", "status", "accelerator", "price_per_hour_micros"),
        Index("ix_offers_status_price", "status", "price_per_hour_micros"),
        # Searches (broker.offers.service.search_offers) by region, and by platform under
        # a price and over a memory size: each page read in price order from the index,
        # each count from the index alone.
        Index("ix_offers_region", "status", "region", "price_per_hour_micros"),
        Index("ix_offers_platform", "status", "platform", "price_per_hour_micros", "memory_gib"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    provider_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    # The node whose agent published it; None for offers listed by hand.
    node_id: Mapped[str | None] = mapped_column(ForeignKey("nodes.id"), default=None, index=True)
    status: Mapped[OfferStatus] = mapped_column(
        Enum(OfferStatus, name="offer_status", native_enum=False, length=16),
        default=OfferStatus.active,
    )
    vendor: Mapped[str] = mapped_column(String(32))
    accelerator: Mapped[str] = mapped_column(String(64))
    platform: Mapped[str] = mapped_column(String(8))
    # Free accelerators: ``capacity`` minus those held by active allocations.
    count: Mapped[int] = mapped_column(Integer)
    # Accelerators listed in all; the provider sets this, clearing moves ``count``.
    capacity: Mapped[int] = mapped_column(Integer)
    # A demo's stand-in for this model, run on a CPU (broker.offers.service.check_emulation).
    emulated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    memory_gib: Mapped[float] = mapped_column(Float)
    fraction_kind: Mapped[FractionKind] = mapped_column(
        Enum(FractionKind, name="fraction_kind", native_enum=False, length=8),
        default=FractionKind.whole,
        server_default=FractionKind.whole.value,
    )
    # Shared offers: shares per accelerator, memory per share, and the shares that
    # active allocations hold over all its accelerators.
    shares: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    memory_per_share_gib: Mapped[float | None] = mapped_column(Float, default=None)
    shares_busy: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # MIG offers: the free instances that exist now ("3g.40gb@4"; empty: the GPU may be
    # cut as clearing proposes) and those active allocations hold.
    mig_instances: Mapped[list[str]] = mapped_column(StrList, default=list, server_default="[]")
    mig_busy: Mapped[list[str]] = mapped_column(StrList, default=list, server_default="[]")
    # The node's device this offer sells, when the agent names one: a node lists one
    # MIG offer per GPU in MIG mode (its UUID), so its agent knows which GPU to run on.
    device: Mapped[str | None] = mapped_column(String(64), default=None)
    tflops_bf16: Mapped[float] = mapped_column(Float)
    tflops_fp32: Mapped[float] = mapped_column(Float)
    mem_bw_gbps: Mapped[float] = mapped_column(Float)
    price_per_hour_micros: Mapped[int] = mapped_column(BigInteger)

    @property
    def price_per_hour(self) -> Decimal:
        """The ask in dollars, as the API shows it (``OfferOut`` reads it)."""
        return micros_to_usd(self.price_per_hour_micros)

    region: Mapped[str] = mapped_column(String(64))
    country: Mapped[str] = mapped_column(String(2))
    lat: Mapped[float] = mapped_column(Float)
    lon: Mapped[float] = mapped_column(Float)
    available_hours: Mapped[float | None] = mapped_column(Float, default=None)
    efficiency: Mapped[float] = mapped_column(Float, default=0.4)
    # What the provider states of its energy (docs/market.md); None: the defaults.
    power_w: Mapped[float | None] = mapped_column(Float, default=None)
    pue: Mapped[float | None] = mapped_column(Float, default=None)
    grid_g_per_kwh: Mapped[float | None] = mapped_column(Float, default=None)
    # Seconds from a work order to the program's first step, as the agent measured
    # them at sign-on (docs/market.md); None: not measured.
    startup_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    # Seconds to move a GB of a program's inputs in and results out of a run, as the
    # agent measured them; None: not measured.
    transfer_s_per_gb: Mapped[float | None] = mapped_column(Float, default=None)
    # Seconds per KB of serialized program that compiling it (and its first run) take,
    # as the agent measured them; None: not measured.
    compile_s_per_kb: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)
    withdrawn_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None)
    # Matches this offer left unstarted past the start timeout, in a row (a started
    # match sets it back to 0); at the limit the offer is suspended.
    unstarted_strikes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    suspended_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None)
    suspended_reason: Mapped[str | None] = mapped_column(Text, default=None)
