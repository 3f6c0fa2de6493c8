from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from adapters import catalog
from broker.auth import Admin, CurrentAccount
from broker.config import get_settings
from broker.db import EngineDep, SessionDep, read_only_session
from broker.errors import NotFound
from broker.market import service
from broker.market.clearing import run_round
from broker.market.models import ClearingRound
from broker.market.schemas import BookQuery, CatalogEntry, OrderBook, RoundOut
from broker.pagination import Page, PageQuery
from broker.types import ObjectId

router = APIRouter(tags=["market"])


@router.get("/v1/market/book", response_model=OrderBook, summary="The order book, by model")
def order_book(
    session: SessionDep, _: CurrentAccount, query: Annotated[BookQuery, Query()]
) -> OrderBook:
    return service.order_book(session, query.accelerator, query.depth)


@router.get("/v1/catalog", response_model=list[CatalogEntry], summary="The hardware catalog")
def hardware_catalog() -> list[CatalogEntry]:
    return [CatalogEntry.model_validate(spec) for spec in catalog.all_specs()]


@router.post(
    "/v1/market/clear",
    response_model=RoundOut,
    summary="Run a clearing round now (admin)",
    responses={409: {"description": "A round is already running"}},
    dependencies=[Depends(read_only_session)],
)
def clear(_: Admin, engine: EngineDep) -> RoundOut:
    record = run_round(engine, get_settings(), trigger="manual")
    assert record is not None  # manual rounds are always recorded
    return RoundOut.model_validate(record)


@router.get(
    "/v1/market/rounds", response_model=Page[RoundOut], summary="Clearing rounds, newest first"
)
def rounds(
    session: SessionDep, _: CurrentAccount, query: Annotated[PageQuery, Query()]
) -> Page[RoundOut]:
    rows, total = service.list_rounds(session, limit=query.limit, offset=query.offset)
    return Page.of([RoundOut.model_validate(r) for r in rows], total, query)


@router.get("/v1/market/rounds/{round_id}", response_model=RoundOut, summary="One clearing round")
def round_detail(session: SessionDep, _: CurrentAccount, round_id: ObjectId) -> RoundOut:
    row = session.get(ClearingRound, round_id)
    if row is None:
        raise NotFound(f"no clearing round {round_id!r}")
    return RoundOut.model_validate(row)
