from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from adapters import catalog
from broker.auth import Admin, BatchedAccount, CurrentAccount
from broker.config import get_settings
from broker.db import EngineDep, SessionDep, TransactionsDep, read_only_session, transaction
from broker.errors import NotFound
from broker.market import carbon, estimates, service
from broker.market.cache import BookCache
from broker.market.clearing import run_round
from broker.market.schemas import (
    BookQuery,
    CarbonMonth,
    CatalogEntry,
    EstimateBand,
    OrderBook,
    RoundOut,
)
from broker.models.market import ClearingRound
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
    _: BatchedAccount,
    query: Annotated[BookQuery, Query()],
    request: Request,
    engine: EngineDep,
    transactions: TransactionsDep,
) -> Any:
    # A busy read: the key is checked in a batch (no session of its own), and a
    # cached book is answered from the event loop, as the JSON it was kept as.
    cache: BookCache = request.app.state.book_cache
    if cache.seconds <= 0:

        def read() -> OrderBook:
            with transactions(write=False) as session:
                return service.order_book(session, query.accelerator, query.depth)

        return await run_in_threadpool(read)

    def compute() -> OrderBook:
        with transaction(engine, write=False) as own:
            return service.order_book(own, None, query.depth)

    # One cached book per depth; a model's book is the same whether asked for alone
    # or with the others, so one model's is cut from it.
    if query.accelerator is None:
        body = cache.cached_json(query.depth, compute)
        if body is None:
            body = await run_in_threadpool(cache.get_json, query.depth, compute)
        return Response(body, media_type="application/json")
    book = await run_in_threadpool(cache.get, query.depth, compute)
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


@router.get(
    "/v1/market/estimates",
    response_model=list[EstimateBand],
    summary="How runtime estimates held, per accelerator model",
)
def estimate_bands(session: SessionDep, _: CurrentAccount) -> list[EstimateBand]:
    return [
        EstimateBand(
            model=b.model,
            runs=b.runs,
            median=b.median,
            low=b.low,
            high=b.high,
            correction=b.correction,
            startup_s=b.startup,
        )
        for b in estimates.bands(session).values()
    ]


@router.get(
    "/v1/carbon",
    response_model=list[CarbonMonth],
    summary="My runs' energy and emissions, by month",
)
def my_carbon(session: SessionDep, account: CurrentAccount) -> list[CarbonMonth]:
    return [
        CarbonMonth(
            period=m.period, runs=m.runs, energy_kwh=m.energy_kwh, gco2=m.gco2, basis=m.basis
        )
        for m in carbon.by_month(session, account.id)
    ]


@router.get("/v1/market/rounds/{round_id}", response_model=RoundOut, summary="One clearing round")
def round_detail(session: SessionDep, _: CurrentAccount, round_id: ObjectId) -> RoundOut:
    row = session.get(ClearingRound, round_id)
    if row is None:
        raise NotFound(f"no clearing round {round_id!r}")
    return RoundOut.model_validate(row)
