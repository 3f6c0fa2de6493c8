from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from starlette.concurrency import run_in_threadpool

from broker.auth import BatchedAccount, CurrentAccount, Provider
from broker.db import SessionDep, TransactionsDep
from broker.money import micros_to_usd
from broker.offers import pages, service
from broker.offers.models import Offer
from broker.offers.schemas import OfferCreate, OfferOut, OfferQuery, OfferUpdate
from broker.pagination import Page
from broker.types import ObjectId

router = APIRouter(prefix="/v1/offers", tags=["offers"])


def offer_out(offer: Offer) -> OfferOut:
    return OfferOut(
        id=offer.id,
        provider_id=offer.provider_id,
        node_id=offer.node_id,
        status=offer.status,
        vendor=offer.vendor,
        accelerator=offer.accelerator,
        platform=offer.platform,
        count=offer.count,
        capacity=offer.capacity,
        memory_gib=offer.memory_gib,
        tflops_bf16=offer.tflops_bf16,
        tflops_fp32=offer.tflops_fp32,
        mem_bw_gbps=offer.mem_bw_gbps,
        price_per_hour=micros_to_usd(offer.price_per_hour_micros),
        region=offer.region,
        country=offer.country,
        lat=offer.lat,
        lon=offer.lon,
        available_hours=offer.available_hours,
        efficiency=offer.efficiency,
        emulated=offer.emulated,
        created_at=offer.created_at,
        updated_at=offer.updated_at,
        withdrawn_at=offer.withdrawn_at,
    )


@router.post("", response_model=OfferOut, status_code=201, summary="List capacity (provider)")
def create_offer(session: SessionDep, provider: Provider, body: OfferCreate) -> OfferOut:
    return offer_out(service.create_offer(session, provider, body))


@router.get("", response_model=Page[OfferOut], summary="Search offers")
async def search_offers(
    account: BatchedAccount, transactions: TransactionsDep, query: Annotated[OfferQuery, Query()]
) -> Response:
    # A busy read: the key is checked in a batch, and the page is read as plain rows
    # and sent as JSON made from them, in one worker thread: no session of the
    # request's own, no ORM objects, no response models to build and check.
    def read() -> bytes:
        with transactions(write=False) as session:
            rows, total = service.search_offer_rows(session, account, query, pages.COLUMNS)
        return pages.page_json(rows, total, query)

    return Response(await run_in_threadpool(read), media_type="application/json")


@router.get("/{offer_id}", response_model=OfferOut, summary="Read an offer")
def get_offer(session: SessionDep, account: CurrentAccount, offer_id: ObjectId) -> OfferOut:
    return offer_out(service.get_visible_offer(session, account, offer_id))


@router.patch("/{offer_id}", response_model=OfferOut, summary="Change an offer (its provider)")
def update_offer(
    session: SessionDep, provider: Provider, offer_id: ObjectId, body: OfferUpdate
) -> OfferOut:
    return offer_out(service.update_offer(session, provider, offer_id, body))


@router.delete("/{offer_id}", response_model=OfferOut, summary="Withdraw an offer (its provider)")
def withdraw_offer(session: SessionDep, provider: Provider, offer_id: ObjectId) -> OfferOut:
    return offer_out(service.withdraw_offer(session, provider, offer_id))
