from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from broker.models.billing import InvoiceStatus
from broker.money import Usd
from broker.pagination import PageQuery
from broker.types import IdField, Moment


class FeeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    percent: Decimal = Field(
        ge=0,
        le=100,
        decimal_places=4,
        description='The broker\'s fee as a percentage of usage charges, e.g. "7.5"',
    )


class FeeOut(BaseModel):
    percent: Decimal = Field(description="In force for matches made from now on")
    set_at: datetime | None = Field(description="When an admin set it (null: the default)")
    set_by: str | None


class InvoiceLineOut(BaseModel):
    id: str
    job_id: str
    allocation_id: str = Field(description="The run (match) this line bills")
    description: str
    accelerator: str
    region: str
    accelerators: int
    accelerator_hours: Decimal = Field(description="Metered usage, to the millisecond")
    rate_per_hour: Usd = Field(description="The ask locked at match, per accelerator-hour")
    fee_percent: Decimal = Field(description="The fee locked at match")
    amount: Usd = Field(description="Hours x rate, rounded to the cent once (half to even)")
    energy_kwh: float = Field(description="Energy of the run at the wall (PUE included)")
    gco2: float = Field(description="Emissions of the run, g CO2e")
    energy_basis: Literal["measured", "estimated"] = Field(
        default="estimated",
        description="measured: from the power readings the provider's agent took over the "
        "run; estimated: the match's estimate for the metered time",
    )
    started_at: datetime | None
    ended_at: datetime | None


class InvoiceSummary(BaseModel):
    id: str
    account_id: str
    status: InvoiceStatus
    currency: str
    period_start: datetime
    period_end: datetime = Field(description="Runs that ended before this are on the invoice")
    subtotal: Usd = Field(description="The sum of the lines")
    fee: Usd = Field(description="The fee on the lines' exact sum, rounded once")
    total: Usd
    line_count: int
    created_at: datetime
    finalized_at: datetime | None
    paid_at: datetime | None
    voided_at: datetime | None
    payment_failed_at: datetime | None = Field(
        description="The last failed payment attempt, while the invoice is open"
    )
    payment_error: str | None
    hosted_invoice_url: str | None = Field(description="Stripe's page to pay it, if any")
    stripe_invoice_id: str | None
    stripe_error: str | None = Field(description="Why the last sync to Stripe failed, if it did")
    hold_reason: str | None = Field(
        default=None,
        description="Held (status held): how Stripe's copy disagrees with this invoice. It "
        "is neither opened nor sent until an admin voids it or releases it "
        "(POST /v1/invoices/{id}/release) once Stripe's copy is fixed",
    )


class InvoiceOut(InvoiceSummary):
    lines: list[InvoiceLineOut]
    fee_percent: Decimal | None = Field(
        description="The fee rate, when every line has the same (null when they differ)"
    )


class InvoiceQuery(PageQuery):
    status: InvoiceStatus | None = Field(default=None, description="Only invoices in this state")
    account_id: IdField | None = Field(
        default=None, description="Admins: only this account's invoices"
    )


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account_id: IdField | None = Field(
        default=None,
        description="Admins: only this account (default: every account). A developer "
        "always generates its own",
    )


class GenerateOut(BaseModel):
    invoices: list[InvoiceSummary] = Field(description="The invoices this call created")
    synced: list[str] = Field(description="Invoices pushed to Stripe and finalized there")
    sync_errors: dict[str, str] = Field(description="Invoices Stripe refused, and why")


class StatementQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: Moment | None = Field(default=None, description="Default: this billing period's")
    end: Moment | None = Field(default=None, description="Default: now")
    provider_id: IdField | None = Field(
        default=None, description="Admins: whose statement (default: yours)"
    )


class StatementRowOut(BaseModel):
    node_id: str | None
    node_name: str | None = Field(description="null: an offer listed by hand, not by an agent")
    offer_id: str
    accelerator: str
    region: str
    rate_per_hour: Usd = Field(description="The ask locked at match")
    runs: int
    accelerator_hours: Decimal
    amount: Usd = Field(description="Hours x rate, rounded to the cent once")
    energy_kwh: float = Field(
        description="Energy of the runs at the wall (PUE included): measured where the agent "
        "measured it, else estimated for the metered time"
    )
    gco2: float = Field(description="Emissions of the runs, g CO2e, on the same basis")
    measured_runs: int = Field(default=0, description="Of runs, those whose energy was measured")


class StatementOut(BaseModel):
    provider_id: str
    start: datetime
    end: datetime
    rows: list[StatementRowOut]
    total: Usd
