from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from broker.accounts import service
from broker.accounts.schemas import AccountCreate, AccountCreated, AccountOut
from broker.auth import Admin, CurrentAccount
from broker.db import SessionDep
from broker.pagination import Page, PageQuery

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
