from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from adapters import catalog
from broker.auth import Admin, CurrentAccount
from broker.config import get_settings
from broker.db import EngineDep, SessionDep, read_only_session, transaction
from broker.errors import NotFound
from broker.market import service
from broker.market.cache import BookCache
from broker.market.clearing import run_round
from broker.market.models import ClearingRound
from broker.market.schemas import BookQuery, CatalogEntry, OrderBook, RoundOut
from broker.offers.service import resolve_model
from broker.pagination import Page, PageQuery
from broker.types import ObjectId

router = APIRouter(tags=["market"])


@router.get(
    "/v1/market/book",
    response_model=OrderBook,
    summary="The order book, by model",
    description="At most `BROKER_BOOK_CACHE_SECONDS` (1) old: `generated_at` says when it "
    "was computed.",
)
async def order_book(
    session: SessionDep,
    _: CurrentAccount,
    query: Annotated[BookQuery, Query()],
    request: Request,
    engine: EngineDep,
) -> OrderBook:
    cache: BookCache = request.app.state.book_cache
    if cache.seconds <= 0:
        # async with its work in one worker thread: see jobs.router.submit_job.
        return await run_in_threadpool(service.order_book, session, query.accelerator, query.depth)

    def compute() -> OrderBook:
        with transaction(engine, write=False) as own:
            return service.order_book(own, None, query.depth)

    # One cached book per depth; a model's book is the same whether asked for alone
    # or with the others, so one model's is cut from it.
    book = await run_in_threadpool(cache.get, query.depth, compute)
    if query.accelerator is None:
        return book
    key = resolve_model(query.accelerator)
    return OrderBook(
        books=[b for b in book.books if b.accelerator == key], generated_at=book.generated_at
    )


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
