from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams

from broker.auth import (
    BATCHED_ACCOUNT,
    BatchedAccount,
    CurrentAccount,
    Provider,
    bearer_key,
)
from broker.db import SessionDep, Transactions, TransactionsDep, request_transactions
from broker.models.account import Account
from broker.offers import pages, service
from broker.offers.schemas import OfferCreate, OfferOut, OfferQuery, OfferUpdate
from broker.pagination import Page
from broker.shortcuts import shortcut_route
from broker.types import ObjectId

router = APIRouter(prefix="/v1/offers", tags=["offers"])


@router.post("", response_model=OfferOut, status_code=201, summary="List capacity (provider)")
def create_offer(session: SessionDep, provider: Provider, body: OfferCreate) -> OfferOut:
    return OfferOut.model_validate(service.create_offer(session, provider, body))


async def search_offers(
    account: BatchedAccount, transactions: TransactionsDep, query: Annotated[OfferQuery, Query()]
) -> Response:
    # Most requests take _search_shortcut's shorter way to the same place.
    return await _search(transactions, account, query)


async def _search(transactions: Transactions, account: Account, query: OfferQuery) -> Response:
    # A busy read: the page is read as plain rows and sent as JSON made from them, in
    # one worker thread: no session of the request's own (the key was checked in a
    # batch), no ORM objects, no response models to build and check.
    def read() -> bytes:
        with transactions(write=False) as session:
            rows, total = service.search_offer_rows(session, account, query, pages.COLUMNS)
        return pages.page_json(rows, total, query)

    return Response(await run_in_threadpool(read), media_type="application/json")


async def _search_shortcut(request: Request) -> Response | None:
    """``GET /v1/offers`` without FastAPI's per-request work (``broker.shortcuts``):
    a search with a bearer key (checked in a batch, as ``BatchedAccount`` does) and
    a query that is a valid ``OfferQuery``; None for anything else."""
    key = await bearer_key(request)
    query = _well_formed(request.query_params)
    if key is None or query is None:
        return None
    transactions = await request_transactions(request)
    account = (await BATCHED_ACCOUNT.admit_batched(request, transactions, key)).account
    return await _search(transactions, account, query)


def _well_formed(params: QueryParams) -> OfferQuery | None:
    """The query of a search that FastAPI would accept, or None: FastAPI's handler
    answers."""
    try:
        # As FastAPI reads a query model: each parameter's last value, in Python mode.
        return OfferQuery.model_validate(dict(params))
    except ValidationError:
        return None


router.add_api_route(
    "",
    search_offers,
    methods=["GET"],
    response_model=Page[OfferOut],
    summary="Search offers",
    route_class_override=shortcut_route(_search_shortcut),
)


@router.get("/{offer_id}", response_model=OfferOut, summary="Read an offer")
def get_offer(session: SessionDep, account: CurrentAccount, offer_id: ObjectId) -> OfferOut:
    return OfferOut.model_validate(service.get_visible_offer(session, account, offer_id))


@router.patch("/{offer_id}", response_model=OfferOut, summary="Change an offer (its provider)")
def update_offer(
    session: SessionDep, provider: Provider, offer_id: ObjectId, body: OfferUpdate
) -> OfferOut:
    return OfferOut.model_validate(service.update_offer(session, provider, offer_id, body))


@router.delete("/{offer_id}", response_model=OfferOut, summary="Withdraw an offer (its provider)")
def withdraw_offer(session: SessionDep, provider: Provider, offer_id: ObjectId) -> OfferOut:
    return OfferOut.model_validate(service.withdraw_offer(session, provider, offer_id))
