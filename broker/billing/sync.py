"""Billing passes: invoices for ended periods, their Stripe copies, Stripe's webhooks.

Stripe calls never run inside a database transaction (on SQLite that would hold
the one write lock for seconds): each step reads in a short transaction, calls
Stripe with an idempotency key, and records the answer in another, so a pass
that dies half way and runs again picks up where it stopped and gets the same
Stripe objects back.

Webhook events are stored under their event id first (a replay finds the row
and does nothing), committed, and handled after that commit in a transaction
of their own; an event whose handling failed is handled again by the next pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker.billing import invoices
from broker.billing.amounts import cents_to_usd
from broker.billing.payments import PaymentsError, Stripe, StripeInvoice
from broker.config import Settings
from broker.db import Transactions, utcnow
from broker.models.account import Account
from broker.models.billing import Invoice, InvoiceLine, InvoiceStatus, StripeCustomer, StripeEvent

log = logging.getLogger(__name__)


@dataclass
class PassReport:
    """What one billing pass did."""

    invoices: list[str] = field(default_factory=list)
    synced: list[str] = field(default_factory=list)
    sync_errors: dict[str, str] = field(default_factory=dict)
    events: int = 0


def generate(
    transactions: Transactions,
    settings: Settings,
    *,
    now: datetime | None = None,
    account_id: str | None = None,
    period_end: bool = True,
) -> PassReport:
    """Invoice what is unbilled, push new invoices to Stripe and handle webhook events
    left over.

    ``period_end`` (the server's pass): bill the runs that ended before the
    current period began, as the previous period's invoices; otherwise (on
    demand) bill everything that ended up to ``now``.
    """
    now = now or utcnow()
    start, _ = invoices.period_bounds(now, settings.billing_period)
    if period_end:
        period_start, cutoff = (
            invoices.period_bounds(start - timedelta(microseconds=1), settings.billing_period)[0],
            start,
        )
    else:
        period_start, cutoff = start, now
    gateway = Stripe.from_settings(settings)
    report = PassReport()
    with transactions() as session:
        made = invoices.generate(
            session,
            period_start=period_start,
            cutoff=cutoff,
            account_id=account_id,
            finalize=gateway is None,
        )
        report.invoices = [i.id for i in made]
    if gateway is not None:
        sync_drafts(transactions, gateway, report, account_id=account_id)
    report.events = process_pending_events(transactions)
    return report


def sync_drafts(
    transactions: Transactions, gateway: Stripe, report: PassReport, account_id: str | None = None
) -> None:
    """Push every draft invoice to Stripe, oldest first."""
    with transactions(write=False) as session:
        stmt = select(Invoice.id).where(Invoice.status == InvoiceStatus.draft)
        if account_id is not None:
            stmt = stmt.where(Invoice.account_id == account_id)
        drafts = list(session.scalars(stmt.order_by(Invoice.created_at, Invoice.id)))
    for invoice_id in drafts:
        try:
            sync_invoice(transactions, gateway, invoice_id)
            report.synced.append(invoice_id)
        except AmountMismatch as e:
            # Never opened nor retried by itself: an admin looks (GET /v1/invoices?status=
            # held), fixes Stripe's copy or voids it, then releases it.
            report.sync_errors[invoice_id] = str(e)
            log.error("invoice %s held for an admin: %s", invoice_id, e)
            _hold(transactions, invoice_id, str(e))
        except PaymentsError as e:
            report.sync_errors[invoice_id] = str(e)
            log.warning("invoice %s: %s; the next billing pass retries", invoice_id, e)
            with transactions() as session:
                row = session.get(Invoice, invoice_id)
                if row is not None:
                    row.stripe_error = str(e)[:2000]


def sync_invoice(transactions: Transactions, gateway: Stripe, invoice_id: str) -> None:
    """Create a draft invoice in Stripe (customer, invoice, items), finalize it there
    and open it here with the page where the developer pays."""
    with transactions(write=False) as session:
        invoice = session.get_one(Invoice, invoice_id)
        if invoice.status != InvoiceStatus.draft:
            return
        account = session.get_one(Account, invoice.account_id)
        customer = session.get(StripeCustomer, account.id)
        customer_id = customer.stripe_customer_id if customer else None
        lines = list(
            session.scalars(
                select(InvoiceLine)
                .where(InvoiceLine.invoice_id == invoice_id)
                .order_by(InvoiceLine.ended_at, InvoiceLine.id)
            )
        )
    if customer_id is None:
        customer_id = _save_customer(
            transactions, account, gateway.create_customer(account.id, account.name)
        )
    stripe_id = invoice.stripe_invoice_id
    if stripe_id is None:
        period = f"{invoice.period_start:%Y-%m-%d} to {invoice.period_end:%Y-%m-%d %H:%M} UTC"
        stripe_id = gateway.create_invoice(customer_id, invoice.id, f"Compute usage, {period}").id
        with transactions() as session:
            session.get_one(Invoice, invoice_id).stripe_invoice_id = stripe_id
    for line in lines:
        if line.stripe_item_id is None:
            item = gateway.add_item(
                customer_id, stripe_id, line.id, line.amount_cents, line.description
            )
            with transactions() as session:
                session.get_one(InvoiceLine, line.id).stripe_item_id = item
    if invoice.fee_cents and invoice.stripe_fee_item_id is None:
        text = f"Broker fee on ${cents_to_usd(invoice.subtotal_cents)} of usage"
        item = gateway.add_item(
            customer_id, stripe_id, f"{invoice.id}-fee", invoice.fee_cents, text
        )
        with transactions() as session:
            session.get_one(Invoice, invoice_id).stripe_fee_item_id = item
    # Compare before finalizing: a finalized invoice is sent and can no longer change.
    copy = gateway.retrieve(stripe_id)
    if copy.status == "draft" and (reason := _disagreement(invoice, lines, copy)):
        raise AmountMismatch(f"not finalized: {reason}")
    final = gateway.finalize(stripe_id) if copy.status == "draft" else copy
    if reason := _disagreement(invoice, lines, final, items=False):
        raise AmountMismatch(f"finalized on Stripe's side, not opened here: {reason}; void it")
    with transactions() as session:
        row = session.get_one(Invoice, invoice_id)
        invoices.open_invoice(row, final.hosted_invoice_url)
        row.stripe_error = None
        if final.status == "paid":
            invoices.mark_paid(row)


class AmountMismatch(PaymentsError):
    """Stripe's copy of an invoice disagrees with ours: it is held for an admin."""


def _disagreement(
    invoice: Invoice, lines: list[InvoiceLine], copy: StripeInvoice, *, items: bool = True
) -> str | None:
    """How Stripe's copy differs from the invoice (its currency, total, and with
    ``items`` each item's amount), or None when they agree."""
    ours = f"invoice {invoice.id} totals {invoice.total_cents} cents"
    if copy.currency.lower() != invoice.currency.lower():
        return f"Stripe's invoice {copy.id} is in {copy.currency}; {ours} in {invoice.currency}"
    if items:
        expected = sorted(
            [line.amount_cents for line in lines] + [invoice.fee_cents] * bool(invoice.fee_cents)
        )
        theirs = sorted(copy.line_amounts)
        if theirs != expected:
            return (
                f"Stripe's invoice {copy.id} has {len(theirs)} item(s) of {theirs} cents; "
                f"{ours} in {len(expected)} of {expected}"
            )
    if copy.amount_due != invoice.total_cents:
        return f"Stripe's invoice {copy.id} asks for {copy.amount_due} cents; {ours}"
    return None


def _hold(transactions: Transactions, invoice_id: str, reason: str) -> None:
    with transactions() as session:
        row = session.scalar(select(Invoice).where(Invoice.id == invoice_id).with_for_update())
        if row is not None:
            invoices.hold(row, reason)
            row.stripe_error = reason[:2000]


def _save_customer(transactions: Transactions, account: Account, customer_id: str) -> str:
    try:
        with transactions() as session:
            session.add(StripeCustomer(account_id=account.id, stripe_customer_id=customer_id))
    except IntegrityError:  # another process saved it first; the key made it the same one
        with transactions(write=False) as session:
            return session.get_one(StripeCustomer, account.id).stripe_customer_id
    return customer_id


# ---- webhooks ---------------------------------------------------------------


def record_event(session: Session, event: dict[str, Any]) -> bool:
    """Store a verified event; False if it was stored before (a replay)."""
    event_id = str(event.get("id") or "")
    if not event_id:
        raise ValueError("the event has no id")
    if session.get(StripeEvent, event_id) is not None:
        return False
    try:
        with session.begin_nested():
            session.add(StripeEvent(id=event_id, type=str(event.get("type")), payload=event))
    except IntegrityError:  # the same event, delivered twice at once
        return False
    return True


def process_event(transactions: Transactions, event_id: str) -> str | None:
    """Handle a stored event once; returns its outcome (None if already handled)."""
    with transactions() as session:
        row = session.scalar(
            select(StripeEvent).where(StripeEvent.id == event_id).with_for_update()
        )
        if row is None or row.processed_at is not None:
            return None
        row.outcome = _apply(session, row.type, row.payload)
        row.processed_at = utcnow()
        return row.outcome


def process_pending_events(transactions: Transactions, limit: int = 500) -> int:
    with transactions(write=False) as session:
        pending = list(
            session.scalars(
                select(StripeEvent.id)
                .where(StripeEvent.processed_at.is_(None))
                .order_by(StripeEvent.received_at)
                .limit(limit)
            )
        )
    done = 0
    for event_id in pending:
        try:
            if process_event(transactions, event_id) is not None:
                done += 1
        except Exception:
            log.exception("Stripe event %s could not be handled; the next pass retries", event_id)
    return done


def _apply(session: Session, kind: str, event: dict[str, Any]) -> str:
    if not kind.startswith("invoice."):
        return f"ignored: {kind} events are not used"
    obj = (event.get("data") or {}).get("object") or {}
    invoice = _find(session, obj)
    if invoice is None:
        return f"ignored: no invoice of this broker is Stripe invoice {obj.get('id')!r}"
    if invoice.status == InvoiceStatus.held:
        return f"invoice {invoice.id} unchanged (held: {invoice.hold_reason})"
    if kind in ("invoice.paid", "invoice.payment_succeeded", "invoice.finalized") and (
        reason := _event_disagreement(invoice, kind, obj)
    ):
        invoices.hold(invoice, reason)
        log.error("invoice %s held for an admin: %s", invoice.id, reason)
        return f"invoice {invoice.id} held: {reason}"
    if kind in ("invoice.paid", "invoice.payment_succeeded"):
        paid_at = (obj.get("status_transitions") or {}).get("paid_at")
        when = datetime.fromtimestamp(paid_at, UTC) if isinstance(paid_at, int) else None
        voided = invoice.status == InvoiceStatus.void
        return _outcome(invoice, not voided and invoices.mark_paid(invoice, when), "paid")
    if kind == "invoice.payment_failed":
        attempt = obj.get("attempt_count")
        reason = f"payment attempt {attempt} failed" if attempt else "a payment attempt failed"
        return _outcome(invoice, invoices.mark_payment_failed(invoice, reason), "payment failed")
    if kind == "invoice.voided":
        paid = invoice.status == InvoiceStatus.paid
        return _outcome(invoice, not paid and invoices.mark_void(invoice), "void")
    if kind == "invoice.finalized":
        url = obj.get("hosted_invoice_url")
        opened = invoice.status == InvoiceStatus.draft
        invoices.open_invoice(invoice, url)
        invoice.hosted_invoice_url = url or invoice.hosted_invoice_url
        return _outcome(invoice, opened, "opened")
    if kind == "invoice.marked_uncollectible":
        failed = invoices.mark_payment_failed(invoice, "Stripe marked it uncollectible")
        return _outcome(invoice, failed, "marked uncollectible")
    return f"ignored: {kind} changes nothing here"


def _event_disagreement(invoice: Invoice, kind: str, obj: dict[str, Any]) -> str | None:
    """How an event's invoice differs from ours in what is owed (or was paid)."""
    currency = str(obj.get("currency") or invoice.currency)
    if currency.lower() != invoice.currency.lower():
        return f"Stripe's {kind} is in {currency}; invoice {invoice.id} in {invoice.currency}"
    field = "amount_due" if kind == "invoice.finalized" else "amount_paid"
    amount = obj.get(field)
    if amount is None and kind != "invoice.finalized":
        amount = obj.get("amount_due")  # an event without amount_paid: what was due
    if not isinstance(amount, int) or isinstance(amount, bool):
        return f"Stripe's {kind} event has no {field} to check"
    if amount != invoice.total_cents:
        return (
            f"Stripe's {kind} event has {field} {amount} cents; invoice {invoice.id} totals "
            f"{invoice.total_cents}"
        )
    return None


def _outcome(invoice: Invoice, changed: bool, what: str) -> str:
    return (
        f"invoice {invoice.id} {what}"
        if changed
        else f"invoice {invoice.id} unchanged ({invoice.status.value})"
    )


def _find(session: Session, obj: dict[str, Any]) -> Invoice | None:
    """Our invoice for a Stripe invoice: by the id we put in its metadata (which works
    even before we recorded Stripe's id), else by Stripe's id."""
    stripe_id = obj.get("id")
    ours = (obj.get("metadata") or {}).get("broker_invoice_id")
    if isinstance(ours, str):
        invoice = session.scalar(select(Invoice).where(Invoice.id == ours).with_for_update())
        if invoice is not None and invoice.stripe_invoice_id in (None, stripe_id):
            return invoice
    if not isinstance(stripe_id, str):
        return None
    return session.scalar(
        select(Invoice).where(Invoice.stripe_invoice_id == stripe_id).with_for_update()
    )
