"""The order book by accelerator model, clearing rounds, and clearing prices.

Asks are active offers, grouped by price. Bids are open jobs' limit prices. A
job may accept many models (its allow-lists can be empty), so a bid appears in
the book of every model it could run on by its static needs: vendor and model
allow-lists, platforms and per-accelerator memory. Bid quantities therefore
overlap across books; within one book they are exact.

A book exists for every model with an ask, and for every catalog model an open
job names explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from adapters import catalog
from broker.db import utcnow
from broker.jobs.models import Job
from broker.jobs.states import JobState
from broker.market.models import Allocation, ClearingRound
from broker.market.schemas import Book, OrderBook, PriceLevel, PricePoint
from broker.money import micros_to_usd
from broker.offers.models import Offer, OfferStatus
from broker.offers.service import resolve_model


@dataclass
class _Model:
    key: str
    name: str | None = None
    vendors: set[str] = field(default_factory=set)
    platforms: set[str] = field(default_factory=set)
    memory_gib: float = 0.0
    asks: list[PriceLevel] = field(default_factory=list)
    bids: dict[int, list[int]] = field(default_factory=dict)  # price -> [quantity, orders]


@dataclass(frozen=True)
class _BidGroup:
    price_micros: int
    min_memory_gib: float
    vendors: tuple[str, ...]
    models: tuple[str, ...]
    platforms: tuple[str, ...]
    accelerators: int
    jobs: int

    def accepts(self, m: _Model) -> bool:
        return (
            (not self.models or m.key in self.models)
            and (not self.vendors or bool(m.vendors.intersection(self.vendors)))
            and bool(m.platforms.intersection(self.platforms))
            and self.min_memory_gib <= m.memory_gib
        )


def order_book(session: Session, accelerator: str | None = None, depth: int = 50) -> OrderBook:
    key = resolve_model(accelerator) if accelerator else None
    models = _ask_side(session, key)
    groups = _bid_groups(session)
    for group in groups:
        for name in group.models:
            spec = catalog.lookup(name)
            if spec and spec.key not in models and (key is None or key == spec.key):
                models[spec.key] = _Model(
                    key=spec.key,
                    name=spec.name,
                    vendors={spec.vendor},
                    platforms={spec.platform},
                    memory_gib=spec.memory_gib,
                )
    for model in models.values():
        for group in groups:
            if group.accepts(model):
                level = model.bids.setdefault(group.price_micros, [0, 0])
                level[0] += group.accelerators
                level[1] += group.jobs
    return OrderBook(
        books=[_book(m, depth) for m in sorted(models.values(), key=lambda m: m.key)],
        generated_at=utcnow(),
    )


def _ask_side(session: Session, key: str | None) -> dict[str, _Model]:
    stmt = (
        select(
            Offer.accelerator,
            Offer.vendor,
            Offer.platform,
            Offer.price_per_hour_micros,
            func.sum(Offer.count),
            func.count(),
            func.max(Offer.memory_gib),
        )
        .where(Offer.status == OfferStatus.active)
        .group_by(Offer.accelerator, Offer.vendor, Offer.platform, Offer.price_per_hour_micros)
        .order_by(Offer.accelerator, Offer.price_per_hour_micros)
    )
    if key:
        stmt = stmt.where(Offer.accelerator == key)
    models: dict[str, _Model] = {}
    for accel, vendor, platform, price, quantity, orders, memory in session.execute(stmt):
        spec = catalog.lookup(accel)
        model = models.setdefault(accel, _Model(key=accel, name=spec.name if spec else None))
        model.vendors.add(vendor)
        model.platforms.add(platform)
        model.memory_gib = max(model.memory_gib, memory)
        if model.asks and model.asks[-1].price_per_hour == micros_to_usd(price):
            # Same price from a second vendor/platform spelling: one level.
            last = model.asks[-1]
            last.quantity += int(quantity)
            last.orders += int(orders)
        else:
            model.asks.append(
                PriceLevel(
                    price_per_hour=micros_to_usd(price), quantity=int(quantity), orders=int(orders)
                )
            )
    return models


def _bid_groups(session: Session) -> list[_BidGroup]:
    """Open jobs, grouped by everything that decides which books they join."""
    stmt = (
        select(
            Job.max_price_per_hour_micros,
            Job.min_memory_gib,
            Job.vendors,
            Job.accelerator_models,
            Job.platforms,
            func.sum(Job.accelerators),
            func.count(),
        )
        .where(Job.state == JobState.open)
        .group_by(
            Job.max_price_per_hour_micros,
            Job.min_memory_gib,
            Job.vendors,
            Job.accelerator_models,
            Job.platforms,
        )
    )
    return [
        _BidGroup(
            price_micros=price,
            min_memory_gib=memory,
            vendors=tuple(vendors),
            models=tuple(models),
            platforms=tuple(platforms),
            accelerators=int(accelerators),
            jobs=int(jobs),
        )
        for price, memory, vendors, models, platforms, accelerators, jobs in session.execute(stmt)
    ]


def _book(model: _Model, depth: int) -> Book:
    bids = [
        PriceLevel(price_per_hour=micros_to_usd(price), quantity=q, orders=n)
        for price, (q, n) in sorted(model.bids.items(), reverse=True)
    ]
    best_ask = model.asks[0].price_per_hour if model.asks else None
    best_bid = bids[0].price_per_hour if bids else None
    spread: Decimal | None = None
    if best_ask is not None and best_bid is not None and best_ask >= best_bid:
        spread = best_ask - best_bid
    return Book(
        accelerator=model.key,
        name=model.name,
        vendors=sorted(model.vendors),
        platforms=sorted(model.platforms),
        memory_gib=model.memory_gib,
        asks=model.asks[:depth],
        bids=bids[:depth],
        best_ask=best_ask,
        best_bid=best_bid,
        spread=spread,
    )


def list_rounds(session: Session, *, limit: int, offset: int) -> tuple[list[ClearingRound], int]:
    """Clearing rounds, newest first, and how many there are."""
    total = session.scalar(select(func.count()).select_from(ClearingRound)) or 0
    rows = session.scalars(
        select(ClearingRound)
        .order_by(ClearingRound.started_at.desc(), ClearingRound.id.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return list(rows), total


def price_history(session: Session, accelerator: str, limit: int = 50) -> list[PricePoint]:
    """The clearing price of one model in each of its last ``limit`` rounds that matched
    it, oldest first: the asks its matches locked, lowest, highest, and averaged over
    the accelerators matched (rounded half-even to the micro-dollar)."""
    key = resolve_model(accelerator)
    price = Allocation.price_per_hour_micros
    rows = session.execute(
        select(
            ClearingRound.id,
            ClearingRound.started_at,
            func.sum(price * Allocation.accelerators),
            func.sum(Allocation.accelerators),
            func.min(price),
            func.max(price),
        )
        .join(Allocation, Allocation.round_id == ClearingRound.id)
        .join(Offer, Offer.id == Allocation.offer_id)
        .where(Offer.accelerator == key)
        .group_by(ClearingRound.id, ClearingRound.started_at)
        .order_by(ClearingRound.started_at.desc(), ClearingRound.id.desc())
        .limit(limit)
    ).all()
    points = []
    for round_id, at, value, quantity, low, high in reversed(rows):
        average = (Decimal(int(value)) / int(quantity)).quantize(Decimal(1), ROUND_HALF_EVEN)
        points.append(
            PricePoint(
                round_id=round_id,
                at=at,
                accelerators=int(quantity),
                low=micros_to_usd(int(low)),
                high=micros_to_usd(int(high)),
                average=micros_to_usd(int(average)),
            )
        )
    return points
