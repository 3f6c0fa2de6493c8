"""Administration: accounts and their keys, and clearing the market on demand."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import ValidationError

from broker.accounts.callers import check_role
from broker.accounts.service import create_account, list_accounts, set_disabled
from broker.billing import service as billing
from broker.billing.schemas import FeeIn
from broker.config import get_settings
from broker.db import EngineDep, SessionDep, read_only_session
from broker.errors import BrokerError, InvalidInput
from broker.market.clearing import run_round
from broker.models.account import Account, Role
from web.forms import attempt, text, values
from web.render import WebRoute, form_errors, page, redirect
from web.session import CheckedForm, WebUser, WebUserDep

router = APIRouter(route_class=WebRoute, include_in_schema=False)

PER_PAGE = 25


def _admin(user: WebUser) -> Account:
    return check_role(user.account, Role.admin)


def _admin_page(
    request: Request,
    session: SessionDep,
    user: WebUser,
    offset: int = 0,
    status: int = 200,
    **context: object,
) -> Response:
    _admin(user)
    accounts, total = list_accounts(session, limit=PER_PAGE, offset=offset)
    fee_ppm, fee_setting = billing.current_fee(session, get_settings())
    context.setdefault("form", {})
    context.setdefault("errors", {})
    context.setdefault("fee_form", {})
    context.setdefault("fee_errors", {})
    return page(
        request,
        "admin.html",
        user,
        status_code=status,
        accounts=accounts,
        total=total,
        limit=PER_PAGE,
        offset=offset,
        roles=[r.value for r in Role],
        fee_ppm=fee_ppm,
        fee_setting=fee_setting,
        **context,
    )


@router.get("/admin")
def admin(
    request: Request,
    session: SessionDep,
    user: WebUserDep,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    notice: Annotated[str, Query(pattern="^(fee|disabled|enabled)?$")] = "",
) -> Response:
    return _admin_page(request, session, user, offset, notice=notice)


@router.post("/admin/accounts")
def new_account(
    request: Request, session: SessionDep, user: WebUserDep, form: CheckedForm
) -> Response:
    _admin(user)
    try:
        role = Role(text(form, "role"))
    except ValueError:
        error = InvalidInput("choose a role: developer, provider or admin", field="role")
        return _admin_page(
            request, session, user, status=422, form=values(form), errors=form_errors(error)
        )
    try:
        account, key = attempt(session, lambda: create_account(session, text(form, "name"), role))
    except BrokerError as e:
        return _admin_page(
            request,
            session,
            user,
            status=e.status_code,
            form=values(form),
            errors=form_errors(e),
        )
    # The key is shown on this page once, like `broker accounts create` prints it.
    return _admin_page(request, session, user, created=account, api_key=key)


@router.post("/admin/accounts/{account_id}/disable")
def disable_account(
    request: Request, session: SessionDep, user: WebUserDep, _: CheckedForm, account_id: str
) -> Response:
    """Every key of the account is refused from the next request on; its sessions end."""
    return _set_disabled(request, session, user, account_id, True)


@router.post("/admin/accounts/{account_id}/enable")
def enable_account(
    request: Request, session: SessionDep, user: WebUserDep, _: CheckedForm, account_id: str
) -> Response:
    return _set_disabled(request, session, user, account_id, False)


def _set_disabled(
    request: Request, session: SessionDep, user: WebUser, account_id: str, disabled: bool
) -> Response:
    admin = _admin(user)
    try:
        attempt(session, lambda: set_disabled(session, admin, account_id, disabled))
    except BrokerError as e:
        return _admin_page(request, session, user, status=e.status_code, account_error=e.message)
    return redirect("/admin", notice="disabled" if disabled else "enabled")


@router.post("/admin/fee")
def set_fee(request: Request, session: SessionDep, user: WebUserDep, form: CheckedForm) -> Response:
    """The fee for matches from now on; matches made already keep the fee they locked."""
    admin = _admin(user)
    try:
        fee = FeeIn.model_validate({"percent": text(form, "percent")})
    except ValidationError as e:
        return _admin_page(
            request, session, user, status=422, fee_form=values(form), fee_errors=form_errors(e)
        )
    billing.set_fee(session, admin, fee.percent)
    return redirect("/admin", notice="fee")


@router.post("/admin/clear", dependencies=[Depends(read_only_session)])
def clear(user: WebUserDep, engine: EngineDep, _: CheckedForm) -> Response:
    """A clearing round now: it runs in transactions of its own, as the API's does."""
    _admin(user)
    record = run_round(engine, get_settings(), trigger="manual")
    assert record is not None  # manual rounds are always recorded
    return redirect("/market", round=record.id)
