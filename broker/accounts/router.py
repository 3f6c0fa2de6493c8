from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from broker.accounts import service
from broker.accounts.schemas import (
    AccountCreate,
    AccountCreated,
    AccountOut,
    KeyCreate,
    KeyCreated,
    KeyOut,
)
from broker.auth import Admin, CurrentAccount
from broker.db import SessionDep
from broker.models.account import ApiKey
from broker.pagination import Page, PageQuery
from broker.types import ObjectId

router = APIRouter(tags=["accounts"])


@router.get("/v1/me", response_model=AccountOut, summary="The account that owns the API key")
def me(account: CurrentAccount) -> AccountOut:
    return AccountOut.model_validate(account)


@router.get("/v1/accounts", response_model=Page[AccountOut], summary="All accounts (admin)")
def list_accounts(
    session: SessionDep, _: Admin, page: Annotated[PageQuery, Query()]
) -> Page[AccountOut]:
    rows, total = service.list_accounts(session, limit=page.limit, offset=page.offset)
    return Page.of([AccountOut.model_validate(a) for a in rows], total, page)


@router.post(
    "/v1/accounts",
    response_model=AccountCreated,
    status_code=201,
    summary="Create an account and its API key (admin)",
)
def create_account(session: SessionDep, _: Admin, body: AccountCreate) -> AccountCreated:
    account, key = service.create_account(session, body.name, body.role)
    return AccountCreated(**AccountOut.model_validate(account).model_dump(), api_key=key)


@router.post(
    "/v1/accounts/{account_id}/disable",
    response_model=AccountOut,
    summary="Disable an account (admin)",
    description="Every key of the account, its nodes' keys included, is refused from the "
    "next request on, in every server process, and its dashboard sessions end. Its data "
    "stays; enabling it again lets the same keys back in.",
)
def disable_account(session: SessionDep, admin: Admin, account_id: ObjectId) -> AccountOut:
    return AccountOut.model_validate(service.set_disabled(session, admin, account_id, True))


@router.post(
    "/v1/accounts/{account_id}/enable",
    response_model=AccountOut,
    summary="Enable a disabled account again (admin)",
)
def enable_account(session: SessionDep, admin: Admin, account_id: ObjectId) -> AccountOut:
    return AccountOut.model_validate(service.set_disabled(session, admin, account_id, False))


def _created(key: ApiKey, clear: str) -> KeyCreated:
    return KeyCreated(**KeyOut.model_validate(key).model_dump(), api_key=clear)


@router.get(
    "/v1/keys",
    response_model=list[KeyOut],
    summary="My API keys, its nodes' included (admins: any account's)",
)
def list_keys(
    session: SessionDep,
    account: CurrentAccount,
    account_id: Annotated[
        str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="Admins")
    ] = None,
) -> list[KeyOut]:
    return [KeyOut.model_validate(k) for k in service.list_keys(session, account, account_id)]


@router.post(
    "/v1/keys",
    response_model=KeyCreated,
    status_code=201,
    summary="Create an API key (admins: for any account)",
)
def create_key(
    session: SessionDep, account: CurrentAccount, body: KeyCreate | None = None
) -> KeyCreated:
    key, clear = service.create_key(session, account, body.account_id if body else None)
    return _created(key, clear)


@router.post(
    "/v1/keys/{key_id}/rotate",
    response_model=KeyCreated,
    status_code=201,
    summary="Replace an API key: the old one is revoked, the new one shown once",
)
def rotate_key(session: SessionDep, account: CurrentAccount, key_id: ObjectId) -> KeyCreated:
    key, clear = service.rotate_key(session, account, key_id)
    return _created(key, clear)


@router.delete(
    "/v1/keys/{key_id}",
    response_model=KeyOut,
    summary="Revoke an API key",
    description="Refused from the next request on, in every server process; dashboard "
    "sessions signed in with it end. A node key: that node's agent stops. Revoking again "
    "changes nothing. Your account's last key cannot be revoked by yourself: create or "
    "rotate one first.",
)
def revoke_key(session: SessionDep, account: CurrentAccount, key_id: ObjectId) -> KeyOut:
    return KeyOut.model_validate(service.revoke_key(session, account, key_id))
