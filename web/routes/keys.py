"""API keys: everyone's own (create, rotate, revoke), as the API's /v1/keys."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from broker.accounts.service import create_key, list_keys, revoke_key, rotate_key
from broker.db import SessionDep
from broker.errors import BrokerError
from broker.models.account import ApiKey
from web.forms import attempt
from web.render import WebRoute, page
from web.session import CheckedForm, WebUser, WebUserDep

router = APIRouter(route_class=WebRoute, include_in_schema=False)


def _row(key: ApiKey) -> dict[str, object]:
    return {
        "id": key.id,
        "prefix": key.prefix,
        "node_id": key.node_id,
        "created_at": key.created_at,
        "last_used_at": key.last_used_at,
        "revoked_at": key.revoked_at,
    }


def _keys_page(
    request: Request, session: SessionDep, user: WebUser, status: int = 200, **context: object
) -> Response:
    keys = [_row(k) for k in list_keys(session, user.account)]
    return page(request, "keys.html", user, status_code=status, keys=keys, **context)


@router.get("/keys")
def keys(request: Request, session: SessionDep, user: WebUserDep) -> Response:
    return _keys_page(request, session, user)


@router.post("/keys")
def new_key(request: Request, session: SessionDep, user: WebUserDep, _: CheckedForm) -> Response:
    row, key = create_key(session, user.account)
    # Shown on this page once, like the API's answer.
    return _keys_page(request, session, user, created=row.id, api_key=key)


@router.post("/keys/{key_id}/rotate")
def rotate(
    request: Request, session: SessionDep, user: WebUserDep, _: CheckedForm, key_id: str
) -> Response:
    try:
        row, key = attempt(session, lambda: rotate_key(session, user.account, key_id))
    except BrokerError as e:
        return _keys_page(request, session, user, status=e.status_code, error=e.message)
    return _keys_page(request, session, user, created=row.id, api_key=key, rotated=key_id)


@router.post("/keys/{key_id}/revoke")
def revoke(
    request: Request, session: SessionDep, user: WebUserDep, _: CheckedForm, key_id: str
) -> Response:
    try:
        attempt(session, lambda: revoke_key(session, user.account, key_id))
    except BrokerError as e:
        return _keys_page(request, session, user, status=e.status_code, error=e.message)
    return _keys_page(request, session, user, revoked=key_id)
