from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Enum, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from broker.db import Base, UtcDateTime, utcnow


class FeeSetting(Base):
    """The broker's fee, as an admin set it; the latest row is in force. New matches
    lock the fee in force when they clear (``Allocation.fee_ppm``)."""

    __tablename__ = "fee_settings"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    fee_ppm: Mapped[int] = mapped_column(Integer)
    set_by: Mapped[str | None] = mapped_column(ForeignKey("accounts.id"), default=None)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)


class InvoiceStatus(enum.StrEnum):
    draft = "draft"  # lines frozen; not yet finalized (with Stripe: not yet synced)
    open = "open"  # finalized, awaiting payment
    paid = "paid"
    void = "void"
    # Stripe's copy disagrees with this one (an amount, an item too many): never opened
    # nor sent to the developer until an admin has looked (``hold_reason`` says why).
    held = "held"


class Invoice(Base):
    """What a developer owes for the runs that ended before ``period_end`` and were not
    billed before. Amounts are whole cents; each line was rounded once (see
    ``broker.billing.amounts``), and ``total = subtotal + fee``."""

    __tablename__ = "invoices"
    __table_args__ = (Index("ix_invoices_account_created", "account_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    status: Mapped[InvoiceStatus] = mapped_column(
        Enum(InvoiceStatus, name="invoice_status", native_enum=False, length=16),
        default=InvoiceStatus.draft,
    )
    currency: Mapped[str] = mapped_column(String(3), default="usd")
    period_start: Mapped[datetime] = mapped_column(UtcDateTime)
    period_end: Mapped[datetime] = mapped_column(UtcDateTime)
    subtotal_cents: Mapped[int] = mapped_column(BigInteger)
    fee_cents: Mapped[int] = mapped_column(BigInteger)
    total_cents: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    finalized_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None)
    paid_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None)
    voided_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None)
    payment_failed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None)
    payment_error: Mapped[str | None] = mapped_column(Text, default=None)
    # Stripe, when configured: its invoice, the fee's invoice item, the page where
    # the developer pays, and the last error syncing (retried by the billing loop).
    stripe_invoice_id: Mapped[str | None] = mapped_column(String(255), unique=True, default=None)
    stripe_fee_item_id: Mapped[str | None] = mapped_column(String(255), default=None)
    hosted_invoice_url: Mapped[str | None] = mapped_column(Text, default=None)
    stripe_error: Mapped[str | None] = mapped_column(Text, default=None)
    hold_reason: Mapped[str | None] = mapped_column(Text, default=None)


class InvoiceLine(Base):
    """One run of a job (one allocation) on an invoice. An allocation is billed on one
    line of one invoice at most: the unique allocation is what makes generating
    invoices twice, or from two processes at once, bill nothing twice."""

    __tablename__ = "invoice_lines"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    invoice_id: Mapped[str] = mapped_column(ForeignKey("invoices.id"), index=True)
    allocation_id: Mapped[str] = mapped_column(ForeignKey("allocations.id"), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    description: Mapped[str] = mapped_column(String(500))
    accelerator: Mapped[str] = mapped_column(String(64))
    region: Mapped[str] = mapped_column(String(64))
    accelerators: Mapped[int] = mapped_column(Integer)
    usage_ms: Mapped[int] = mapped_column(BigInteger)
    price_per_hour_micros: Mapped[int] = mapped_column(BigInteger)
    fee_ppm: Mapped[int] = mapped_column(Integer)
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    # The run's energy and emissions: measured by its agent, or estimated for its
    # metered time (docs/market.md); ``energy_basis`` says which.
    energy_kwh: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    gco2: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    energy_basis: Mapped[str] = mapped_column(
        String(16), default="estimated", server_default="estimated"
    )
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None)
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None)
    stripe_item_id: Mapped[str | None] = mapped_column(String(255), default=None)


class StripeCustomer(Base):
    """The Stripe customer that pays an account's invoices."""

    __tablename__ = "stripe_customers"

    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    stripe_customer_id: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class StripeEvent(Base):
    """A webhook event, stored under Stripe's event id so a replay does nothing."""

    __tablename__ = "stripe_events"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(100))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    processed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None, index=True)
    outcome: Mapped[str | None] = mapped_column(Text, default=None)
