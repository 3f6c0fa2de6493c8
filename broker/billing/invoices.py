"""Invoices: what developers owe for the runs that ended, a line per run.

Generating invoices bills every run (allocation) that has ended with metered
usage and is on no invoice yet, up to a cut-off: at the end of each billing
period (the server's billing pass) and on demand (``broker invoices
generate``, ``POST /v1/invoices/generate``). A run is billed once: the invoice
line's unique allocation guarantees it, whoever generates and however often, so
generating again finds nothing new and creates nothing. A run still going at
the cut-off is billed on the invoice after it ends.

Functions take the session and never commit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker.accounts.visibility import own_rows, owns
from broker.billing.amounts import fee_on, to_cents, usage_charge
from broker.db import new_id, utcnow
from broker.errors import Conflict, Forbidden, NotFound
from broker.ledger import footprint, held_label
from broker.models.account import Account, Role
from broker.models.billing import Invoice, InvoiceLine, InvoiceStatus
from broker.models.job import Job
from broker.models.market import Allocation, AllocationStatus
from broker.models.offer import Offer
from broker.money import micros_to_usd

Period = Literal["month", "week", "day"]


def period_bounds(moment: datetime, period: Period) -> tuple[datetime, datetime]:
    """The calendar period (UTC) that contains ``moment``: [start, end)."""
    moment = moment.astimezone(UTC)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day, day + timedelta(days=1)
    if period == "week":  # ISO weeks start on Monday
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    start = day.replace(day=1)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


@dataclass(frozen=True, slots=True)
class _Run:
    allocation: Allocation
    job: Job
    offer: Offer


def _unbilled(session: Session, cutoff: datetime, account_id: str | None) -> list[_Run]:
    stmt = (
        select(Allocation, Job, Offer)
        .join(Job, Job.id == Allocation.job_id)
        .join(Offer, Offer.id == Allocation.offer_id)
        .outerjoin(InvoiceLine, InvoiceLine.allocation_id == Allocation.id)
        .where(
            InvoiceLine.id.is_(None),
            Allocation.status != AllocationStatus.active,
            Allocation.usage_ms > 0,
            Allocation.ended_at < cutoff,
        )
        .order_by(Job.account_id, Allocation.ended_at, Allocation.id)
    )
    if account_id is not None:
        stmt = stmt.where(Job.account_id == account_id)
    return [_Run(a, j, o) for a, j, o in session.execute(stmt).all()]


def _by_account(runs: list[_Run]) -> Iterator[tuple[str, list[_Run]]]:
    group: list[_Run] = []
    for run in runs:
        if group and group[0].job.account_id != run.job.account_id:
            yield group[0].job.account_id, group
            group = []
        group.append(run)
    if group:
        yield group[0].job.account_id, group


def _line(invoice_id: str, run: _Run) -> InvoiceLine:
    a, job, offer = run.allocation, run.job, run.offer
    amount = usage_charge(a.usage_ms, a.price_per_hour_micros)
    hours = Fraction(a.usage_ms, 3_600_000)
    rate = micros_to_usd(a.price_per_hour_micros)
    energy, gco2, basis = footprint(a)
    return InvoiceLine(
        energy_kwh=energy,
        gco2=gco2,
        energy_basis=basis,
        id=new_id("inl"),
        invoice_id=invoice_id,
        allocation_id=a.id,
        job_id=job.id,
        description=(
            f"{job.name or job.id}: {a.accelerators} x {offer.accelerator} in {offer.region}, "
            f"{float(hours):.4f} accelerator-hours at ${rate}/h"
            if a.slice is None
            # Metered at its share: the hours it ran are the accelerator-hours over it.
            else f"{job.name or job.id}: {held_label(offer.accelerator, a)} in "
            f"{offer.region}, {float(hours * a.share_den / a.share_num):.4f} h "
            f"({float(hours):.4f} accelerator-hours) at ${rate}/h"
        )[:500],
        accelerator=offer.accelerator,
        region=offer.region,
        accelerators=a.accelerators,
        usage_ms=a.usage_ms,
        price_per_hour_micros=a.price_per_hour_micros,
        fee_ppm=a.fee_ppm,
        amount_cents=to_cents(amount),
        started_at=a.started_at,
        ended_at=a.ended_at,
    )


def totals(lines: list[InvoiceLine]) -> tuple[int, int]:
    """(subtotal, fee) in cents: the sum of the lines, each rounded once, and the fee
    on their exact sum, rounded once."""
    subtotal = sum(line.amount_cents for line in lines)
    fee = fee_exact(lines)
    return subtotal, to_cents(fee)


def fee_exact(lines: list[InvoiceLine]) -> Fraction:
    return sum(
        (fee_on(usage_charge(ln.usage_ms, ln.price_per_hour_micros), ln.fee_ppm) for ln in lines),
        Fraction(0),
    )


def generate(
    session: Session,
    *,
    period_start: datetime,
    cutoff: datetime,
    account_id: str | None = None,
    finalize: bool = True,
) -> list[Invoice]:
    """Invoice every ended, unbilled run that ended before ``cutoff``: one invoice per
    developer account (or only ``account_id``'s).

    ``finalize`` opens the invoices at once (no payment processor; a zero total is
    paid); otherwise they stay drafts until they are synced to Stripe. Runs that
    another process billed meanwhile are left to it.
    """
    created = []
    for owner, runs in _by_account(_unbilled(session, cutoff, account_id)):
        try:
            with session.begin_nested():
                created.append(_invoice(session, owner, runs, period_start, cutoff, finalize))
        except IntegrityError:
            continue  # another process billed these runs first: its invoice has them
    return created


def _invoice(
    session: Session,
    account_id: str,
    runs: list[_Run],
    period_start: datetime,
    cutoff: datetime,
    finalize: bool,
) -> Invoice:
    invoice_id = new_id("inv")
    lines = [_line(invoice_id, run) for run in runs]
    subtotal, fee = totals(lines)
    invoice = Invoice(
        id=invoice_id,
        account_id=account_id,
        status=InvoiceStatus.draft,
        # A run left unbilled from an earlier period (the server was down when it
        # ended) widens the period rather than hiding in it.
        period_start=min([period_start, cutoff, *(r.allocation.ended_at or cutoff for r in runs)]),
        period_end=cutoff,
        subtotal_cents=subtotal,
        fee_cents=fee,
        total_cents=subtotal + fee,
        created_at=utcnow(),
    )
    session.add(invoice)
    session.flush()
    session.add_all(lines)
    session.flush()
    if finalize or invoice.total_cents == 0:
        open_invoice(invoice)
    return invoice


def open_invoice(invoice: Invoice, hosted_invoice_url: str | None = None) -> None:
    """Finalize a draft: nothing on it changes any more. A zero total is paid at once."""
    if invoice.status != InvoiceStatus.draft:
        return
    invoice.finalized_at = utcnow()
    invoice.hosted_invoice_url = hosted_invoice_url
    if invoice.total_cents == 0:
        invoice.status, invoice.paid_at = InvoiceStatus.paid, invoice.finalized_at
    else:
        invoice.status = InvoiceStatus.open


def hold(invoice: Invoice, reason: str) -> bool:
    """Keep an invoice from being opened or sent until an admin has looked: its copy at
    the payment processor disagrees with it (``reason`` says how). Returns whether
    anything changed."""
    if invoice.status in (InvoiceStatus.paid, InvoiceStatus.void):
        return False
    changed = invoice.status != InvoiceStatus.held or invoice.hold_reason != reason
    invoice.status, invoice.hold_reason = InvoiceStatus.held, reason[:2000]
    return changed


def release(invoice: Invoice) -> None:
    """An admin has fixed what held the invoice: it goes back to the draft it was, and
    the next billing pass checks Stripe's copy again before it opens it."""
    if invoice.status != InvoiceStatus.held:
        raise Conflict(f"invoice {invoice.id} is {invoice.status.value}, not held")
    invoice.status, invoice.hold_reason = InvoiceStatus.draft, None


def mark_paid(invoice: Invoice, when: datetime | None = None) -> bool:
    """Record a payment; returns whether anything changed (a repeat changes nothing)."""
    if invoice.status == InvoiceStatus.paid:
        return False
    if invoice.status == InvoiceStatus.void:
        raise Conflict(f"invoice {invoice.id} is void; a void invoice cannot be paid")
    invoice.finalized_at = invoice.finalized_at or utcnow()
    invoice.status, invoice.paid_at = InvoiceStatus.paid, when or utcnow()
    invoice.payment_error = None
    return True


def mark_void(invoice: Invoice, when: datetime | None = None) -> bool:
    """Cancel what is owed. Its runs stay billed (on this void invoice), so they are
    never billed again."""
    if invoice.status == InvoiceStatus.void:
        return False
    if invoice.status == InvoiceStatus.paid:
        raise Conflict(f"invoice {invoice.id} is paid; refund it instead of voiding it")
    invoice.status, invoice.voided_at = InvoiceStatus.void, when or utcnow()
    return True


def mark_payment_failed(invoice: Invoice, reason: str) -> bool:
    """A payment attempt failed: the invoice stays open (the processor retries)."""
    if invoice.status != InvoiceStatus.open:
        return False
    invoice.payment_failed_at, invoice.payment_error = utcnow(), reason[:2000]
    return True


def _check_reader(viewer: Account) -> None:
    if viewer.role == Role.provider:
        raise Forbidden(
            "invoices are for developers; a provider's earnings are in GET /v1/statements"
        )


def get_invoice(
    session: Session, viewer: Account, invoice_id: str, *, lock: bool = False
) -> tuple[Invoice, list[InvoiceLine]]:
    """An invoice and its lines: the developer's own, or any for an admin."""
    _check_reader(viewer)
    stmt = select(Invoice).where(Invoice.id == invoice_id)
    if lock:
        stmt = stmt.with_for_update()
    invoice = session.scalar(stmt)
    if invoice is None or not owns(viewer, invoice.account_id):
        raise NotFound(f"no invoice {invoice_id!r} of yours")
    lines = session.scalars(
        select(InvoiceLine)
        .where(InvoiceLine.invoice_id == invoice.id)
        .order_by(InvoiceLine.ended_at, InvoiceLine.id)
    ).all()
    return invoice, list(lines)


def list_invoices(
    session: Session,
    viewer: Account,
    *,
    status: InvoiceStatus | None,
    account_id: str | None,
    limit: int,
    offset: int,
) -> tuple[list[Invoice], int]:
    """Newest first: the developer's own; an admin's, everyone's (or ``account_id``'s)."""
    _check_reader(viewer)
    conditions = own_rows(viewer, Invoice.account_id)
    if not conditions and account_id is not None:
        conditions.append(Invoice.account_id == account_id)
    if status is not None:
        conditions.append(Invoice.status == status)
    total = session.scalar(select(func.count()).select_from(Invoice).where(*conditions)) or 0
    rows = session.scalars(
        select(Invoice)
        .where(*conditions)
        .order_by(Invoice.created_at.desc(), Invoice.id.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return list(rows), total


def line_counts(session: Session, invoice_ids: list[str]) -> dict[str, int]:
    if not invoice_ids:
        return {}
    rows = session.execute(
        select(InvoiceLine.invoice_id, func.count())
        .where(InvoiceLine.invoice_id.in_(invoice_ids))
        .group_by(InvoiceLine.invoice_id)
    ).all()
    return {invoice_id: count for invoice_id, count in rows}
