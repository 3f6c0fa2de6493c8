from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from adapters import catalog
from broker.auth import CurrentAccount
from broker.db import SessionDep
from broker.market import service
from broker.market.schemas import BookQuery, CatalogEntry, OrderBook

router = APIRouter(tags=["market"])


@router.get("/v1/market/book", response_model=OrderBook, summary="The order book, by model")
def order_book(
    session: SessionDep, _: CurrentAccount, query: Annotated[BookQuery, Query()]
) -> OrderBook:
    return service.order_book(session, query.accelerator, query.depth)


@router.get("/v1/catalog", response_model=list[CatalogEntry], summary="The hardware catalog")
def hardware_catalog() -> list[CatalogEntry]:
    return [
        CatalogEntry(
            key=s.key,
            name=s.name,
            vendor=s.vendor,
            platform=s.platform,
            form_factor=s.form_factor,
            memory_gib=s.memory_gib,
            tflops_bf16=s.tflops_bf16,
            tflops_fp32=s.tflops_fp32,
            mem_bw_gbps=s.mem_bw_gbps,
            tdp_w=s.tdp_w,
            aliases=list(s.aliases),
            source=s.source,
        )
        for s in catalog.all_specs()
    ]
