"""Billing endpoints: the fee, invoices, statements and Stripe's webhook."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from broker.accounts.callers import check_role
from broker.accounts.visibility import sees_all
from broker.auth import Admin, CurrentAccount, StreamingAccount
from broker.billing import invoices, statements, sync
from broker.billing import service as billing
from broker.billing.amounts import cents_to_usd, ppm_to_percent
from broker.billing.payments import PaymentsError, Stripe, verify_event
from broker.billing.schemas import (
    FeeIn,
    FeeOut,
    GenerateIn,
    GenerateOut,
    InvoiceLineOut,
    InvoiceOut,
    InvoiceQuery,
    InvoiceSummary,
    StatementOut,
    StatementQuery,
    StatementRowOut,
)
from broker.config import get_settings
from broker.db import SessionDep, Transactions, TransactionsDep, utcnow
from broker.errors import BrokerError, Conflict, InvalidInput, NotFound
from broker.models.account import Role
from broker.models.billing import Invoice, InvoiceLine
from broker.money import micros_to_usd
from broker.pagination import Page
from broker.types import ObjectId

router = APIRouter(tags=["billing"])

_HOURS = Decimal("0.000001")


class PaymentsUnavailable(BrokerError):
    status_code = 502
    code = "payments_unavailable"


class WebhookRefused(BrokerError):
    status_code = 400
    code = "webhook_refused"


@router.get("/v1/billing/fee", response_model=FeeOut, summary="The broker's fee")
def get_fee(session: SessionDep, account: CurrentAccount) -> FeeOut:
    return _fee_out(session)


@router.put("/v1/billing/fee", response_model=FeeOut, summary="Set the broker's fee (admin)")
def put_fee(session: SessionDep, admin: Admin, body: FeeIn) -> FeeOut:
    billing.set_fee(session, admin, body.percent)
    return _fee_out(session)


def _fee_out(session: Session) -> FeeOut:
    ppm, row = billing.current_fee(session, get_settings())
    return FeeOut(
        percent=ppm_to_percent(ppm),
        set_at=row.created_at if row else None,
        set_by=row.set_by if row else None,
    )


@router.get(
    "/v1/invoices", response_model=Page[InvoiceSummary], summary="My invoices (admins: all)"
)
def list_invoices(
    session: SessionDep, account: CurrentAccount, query: Annotated[InvoiceQuery, Query()]
) -> Page[InvoiceSummary]:
    rows, total = invoices.list_invoices(
        session,
        account,
        status=query.status,
        account_id=query.account_id,
        limit=query.limit,
        offset=query.offset,
    )
    counts = invoices.line_counts(session, [i.id for i in rows])
    return Page.of([_summary(i, counts.get(i.id, 0)) for i in rows], total, query)


@router.get("/v1/invoices/{invoice_id}", response_model=InvoiceOut, summary="One invoice")
def get_invoice(session: SessionDep, account: CurrentAccount, invoice_id: ObjectId) -> InvoiceOut:
    return _invoice_out(*invoices.get_invoice(session, account, invoice_id))


@router.post(
    "/v1/invoices/generate",
    response_model=GenerateOut,
    summary="Invoice what is unbilled, now (developer: yours; admin: everyone's)",
    description="Bills every run that has ended and is on no invoice yet, up to now, and "
    "(with Stripe) pushes the new invoices to Stripe. Idempotent: a run is billed once, "
    "so calling it again creates nothing until more runs end.",
)
def generate_invoices(
    transactions: TransactionsDep, account: StreamingAccount, body: GenerateIn | None = None
) -> GenerateOut:
    check_role(account, Role.developer)
    account_id = (body.account_id if body else None) if sees_all(account) else account.id
    report = sync.generate(transactions, get_settings(), account_id=account_id, period_end=False)
    with transactions(write=False) as session:
        rows = [session.get_one(Invoice, i) for i in report.invoices]
        counts = invoices.line_counts(session, report.invoices)
        made = [_summary(i, counts.get(i.id, 0)) for i in rows]
    return GenerateOut(invoices=made, synced=report.synced, sync_errors=report.sync_errors)


@router.post(
    "/v1/invoices/{invoice_id}/pay",
    response_model=InvoiceOut,
    summary="Mark an invoice paid (admin; invoices not collected by Stripe)",
)
def pay_invoice(session: SessionDep, admin: Admin, invoice_id: ObjectId) -> InvoiceOut:
    invoice, lines = invoices.get_invoice(session, admin, invoice_id, lock=True)
    if invoice.stripe_invoice_id is not None:
        raise Conflict(
            f"invoice {invoice.id} is collected by Stripe ({invoice.stripe_invoice_id}); "
            "it is marked paid when Stripe reports the payment"
        )
    invoices.mark_paid(invoice)
    return _invoice_out(invoice, lines)


@router.post(
    "/v1/invoices/{invoice_id}/void",
    response_model=InvoiceOut,
    summary="Void an invoice (admin): nothing is owed; its runs are never billed again",
)
def void_invoice(
    transactions: TransactionsDep, admin: StreamingAccount, invoice_id: ObjectId
) -> InvoiceOut:
    check_role(admin, Role.admin)
    with transactions(write=False) as session:
        invoice, _ = invoices.get_invoice(session, admin, invoice_id)
    gateway = Stripe.from_settings(get_settings())
    if invoice.stripe_invoice_id is not None and invoice.status.value in ("draft", "open", "held"):
        if gateway is None:
            raise PaymentsUnavailable("this invoice is in Stripe, and Stripe is not configured")
        try:
            gateway.void(invoice.stripe_invoice_id)
        except PaymentsError as e:
            raise PaymentsUnavailable(str(e)) from None
    with transactions() as session:
        invoice, lines = invoices.get_invoice(session, admin, invoice_id, lock=True)
        invoices.mark_void(invoice)
        return _invoice_out(invoice, lines)


@router.post(
    "/v1/invoices/{invoice_id}/release",
    response_model=InvoiceOut,
    summary="Release a held invoice (admin): Stripe's copy is checked again, then opened",
    description="An invoice is held when Stripe's copy disagrees with it (an item added "
    "twice, an amount edited there): fix Stripe's draft first, or void the invoice. The "
    "next billing pass compares them again before it finalizes.",
)
def release_invoice(session: SessionDep, admin: Admin, invoice_id: ObjectId) -> InvoiceOut:
    invoice, lines = invoices.get_invoice(session, admin, invoice_id, lock=True)
    invoices.release(invoice)
    return _invoice_out(invoice, lines)


@router.get(
    "/v1/statements",
    response_model=StatementOut,
    summary="My earnings: usage sold at my asks, by node and offer (provider; admin: any)",
)
def get_statement(
    session: SessionDep, account: CurrentAccount, query: Annotated[StatementQuery, Query()]
) -> StatementOut:
    now = utcnow()
    start = query.start or invoices.period_bounds(now, get_settings().billing_period)[0]
    end = query.end or now
    if end <= start:
        raise InvalidInput("end must be after start", field="query.end")
    result = statements.statement(session, account, query.provider_id, start, end)
    return StatementOut(
        provider_id=result.provider_id,
        start=result.start,
        end=result.end,
        rows=[
            StatementRowOut(
                node_id=r.node_id,
                node_name=r.node_name,
                offer_id=r.offer_id,
                accelerator=r.accelerator,
                region=r.region,
                rate_per_hour=micros_to_usd(r.price_per_hour_micros),
                runs=r.runs,
                accelerator_hours=_hours(r.usage_ms),
                amount=cents_to_usd(r.amount_cents),
                energy_kwh=r.energy_kwh,
                gco2=r.gco2,
                measured_runs=r.measured_runs,
            )
            for r in result.rows
        ],
        total=cents_to_usd(result.total_cents),
    )


@router.post(
    "/v1/stripe/webhook",
    summary="Stripe's webhook endpoint (signed by Stripe)",
    responses={400: {"description": "Bad signature, stale timestamp or not an event"}},
)
async def stripe_webhook(
    request: Request,
    transactions: TransactionsDep,
    stripe_signature: Annotated[str | None, Header(alias="Stripe-Signature")] = None,
) -> dict[str, Any]:
    secret = get_settings().stripe_webhook_secret
    if secret is None:
        raise NotFound("Stripe webhooks are not configured (BROKER_STRIPE_WEBHOOK_SECRET)")
    payload = await request.body()
    try:
        event = verify_event(payload, stripe_signature, secret.get_secret_value())
    except ValueError as e:
        raise WebhookRefused(str(e), field="header.Stripe-Signature") from None
    return await _store_and_handle(transactions, event)


async def _store_and_handle(transactions: Transactions, event: dict[str, Any]) -> dict[str, Any]:
    """Store the event and commit, then handle it in a transaction of its own."""

    def work() -> dict[str, Any]:
        with transactions() as session:
            fresh = sync.record_event(session, event)
        if not fresh:
            return {"received": True, "duplicate": True}
        try:
            outcome = sync.process_event(transactions, event["id"])
        except Exception:  # stored: the next billing pass handles it again
            outcome = "failed; it will be retried"
        return {"received": True, "duplicate": False, "outcome": outcome}

    return await run_in_threadpool(work)


def _hours(usage_ms: int) -> Decimal:
    return (Decimal(usage_ms) / 3_600_000).quantize(_HOURS)


def _summary(i: Invoice, line_count: int) -> InvoiceSummary:
    return InvoiceSummary(
        id=i.id,
        account_id=i.account_id,
        status=i.status,
        currency=i.currency,
        period_start=i.period_start,
        period_end=i.period_end,
        subtotal=cents_to_usd(i.subtotal_cents),
        fee=cents_to_usd(i.fee_cents),
        total=cents_to_usd(i.total_cents),
        line_count=line_count,
        created_at=i.created_at,
        finalized_at=i.finalized_at,
        paid_at=i.paid_at,
        voided_at=i.voided_at,
        payment_failed_at=i.payment_failed_at,
        payment_error=i.payment_error,
        hosted_invoice_url=i.hosted_invoice_url,
        stripe_invoice_id=i.stripe_invoice_id,
        stripe_error=i.stripe_error,
        hold_reason=i.hold_reason,
    )


def _invoice_out(i: Invoice, lines: list[InvoiceLine]) -> InvoiceOut:
    rates = {ln.fee_ppm for ln in lines}
    return InvoiceOut(
        **_summary(i, len(lines)).model_dump(),
        lines=[
            InvoiceLineOut(
                id=ln.id,
                job_id=ln.job_id,
                allocation_id=ln.allocation_id,
                description=ln.description,
                accelerator=ln.accelerator,
                region=ln.region,
                accelerators=ln.accelerators,
                accelerator_hours=_hours(ln.usage_ms),
                rate_per_hour=micros_to_usd(ln.price_per_hour_micros),
                fee_percent=ppm_to_percent(ln.fee_ppm),
                amount=cents_to_usd(ln.amount_cents),
                energy_kwh=ln.energy_kwh,
                gco2=ln.gco2,
                energy_basis="measured" if ln.energy_basis == "measured" else "estimated",
                started_at=ln.started_at,
                ended_at=ln.ended_at,
            )
            for ln in lines
        ],
        fee_percent=ppm_to_percent(rates.pop()) if len(rates) == 1 else None,
    )
