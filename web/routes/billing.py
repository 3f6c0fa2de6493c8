"""Money: a developer's invoices, a provider's earnings, and the fee (set on the admin page)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy.orm import Session

from broker.accounts.callers import check_role
from broker.accounts.service import account_names
from broker.accounts.visibility import sees_all
from broker.billing import invoices, statements, sync
from broker.config import get_settings
from broker.db import SessionDep, TransactionsDep, read_only_session, utcnow
from broker.errors import InvalidInput
from broker.models.account import Role
from broker.models.billing import InvoiceStatus
from broker.types import ObjectId
from web.forms import choice
from web.render import WebRoute, page, redirect
from web.session import CheckedForm, WebUser, WebUserDep

router = APIRouter(route_class=WebRoute, include_in_schema=False)

PER_PAGE = 20


@router.get("/invoices")
def invoice_list(
    request: Request,
    session: SessionDep,
    user: WebUserDep,
    status: Annotated[str, Query(max_length=16)] = "",
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    made: Annotated[int, Query(ge=-1, le=100_000)] = -1,
) -> Response:
    rows, total = invoices.list_invoices(
        session,
        user.account,
        status=choice(InvoiceStatus, status, "status"),
        account_id=None,
        limit=PER_PAGE,
        offset=offset,
    )
    return page(
        request,
        "invoices.html",
        user,
        invoices=rows,
        names=_names(session, user, [i.account_id for i in rows]),
        lines=invoices.line_counts(session, [i.id for i in rows]),
        total=total,
        limit=PER_PAGE,
        offset=offset,
        status=status,
        statuses=[s.value for s in InvoiceStatus],
        made=made,
    )


@router.post("/invoices/generate", dependencies=[Depends(read_only_session)])
def generate(user: WebUserDep, transactions: TransactionsDep, _: CheckedForm) -> Response:
    """Invoice every ended, unbilled run now: the developer's own, or everyone's for an
    admin (as ``POST /v1/invoices/generate``). Idempotent: a run is billed once."""
    account = check_role(user.account, Role.developer)
    mine = account.id if not sees_all(account) else None
    report = sync.generate(transactions, get_settings(), account_id=mine, period_end=False)
    return redirect("/invoices", made=str(len(report.invoices)))


@router.get("/invoices/{invoice_id}")
def invoice(
    request: Request, session: SessionDep, user: WebUserDep, invoice_id: ObjectId
) -> Response:
    found, lines = invoices.get_invoice(session, user.account, invoice_id)
    rates = {line.fee_ppm for line in lines}
    return page(
        request,
        "invoice.html",
        user,
        invoice=found,
        names=_names(session, user, [found.account_id]),
        lines=lines,
        fee_ppm=rates.pop() if len(rates) == 1 else None,
    )


def _names(session: Session, user: WebUser, ids: list[str]) -> dict[str, str]:
    """Admins see whose invoices they are, by account name."""
    return account_names(session, ids) if sees_all(user.account) else {}


def _day(value: str, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"{name} must be a date, YYYY-MM-DD", field=name) from None


@router.get("/earnings")
def earnings(
    request: Request,
    session: SessionDep,
    user: WebUserDep,
    start: Annotated[str, Query(max_length=10)] = "",
    end: Annotated[str, Query(max_length=10)] = "",
    provider: Annotated[str, Query(pattern="^[A-Za-z0-9_-]{0,64}$")] = "",
) -> Response:
    """A provider's statement: usage sold at its asks, by node and offer, from runs
    that ended between two days (default: this billing period up to now)."""
    check_role(user.account, Role.provider)
    now = utcnow()
    first, last = _day(start, "start"), _day(end, "end")
    since = (
        datetime.combine(first, time(), UTC)
        if first
        else invoices.period_bounds(now, get_settings().billing_period)[0]
    )
    until = datetime.combine(last, time(), UTC) + timedelta(days=1) if last else now
    if until <= since:
        raise InvalidInput("the end must be on or after the start", field="end")
    result = statements.statement(session, user.account, provider or None, since, until)
    providers: list[tuple[str, str]] = []
    if sees_all(user.account):
        providers = list(account_names(session, role=Role.provider).items())
    return page(
        request,
        "earnings.html",
        user,
        statement=result,
        providers=providers,
        start=since.date().isoformat(),
        end=(until - timedelta(microseconds=1)).date().isoformat(),
        provider=provider,
    )
