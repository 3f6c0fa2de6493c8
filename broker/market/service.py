"""The order book by accelerator model, clearing rounds, and clearing prices.

Asks are active offers, grouped by price. Bids are open jobs' limit prices. A
job may accept many models (its allow-lists can be empty), so a bid appears in
the book of every model it could run on by its static needs: vendor and model
allow-lists, platforms and per-accelerator memory. Bid quantities therefore
overlap across books; within one book they are exact.

A book exists for every model with an ask, and for every catalog model an open
job names explicitly. A job needs all its accelerators on one offer, so a bid for
more than the largest offer of a model lists could never be filled there: it is
shown apart (``unfillable``), and never makes the book look crossed.

Fractions have levels of their own (``slice_asks``, ``slice_bids``): free MIG
instances and AMD partitions by profile, free shares of shared offers, and open
jobs for part of one accelerator, each at its price per accelerator-hour. A MIG
offer is not a whole accelerator to anyone, so it is not in ``asks``; a shared
accelerator no share of is held is (a whole job may take all of it).
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal

from sqlalchemy import ColumnElement, Text, cast, func, select
from sqlalchemy.orm import Session

from adapters import catalog, grid, mig
from broker.db import utcnow
from broker.market.schemas import Book, OrderBook, PriceLevel, PricePoint, SliceLevel
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.market import Allocation, ClearingRound
from broker.models.offer import FractionKind, Offer, OfferStatus
from broker.money import micros_to_usd
from broker.offers.service import resolve_model

# A price level before it is shown: (price in micro-dollars, accelerators, orders).
_Level = tuple[int, int, int]
# A fraction's part and whether it is isolated: ("3g.40gb", True), ("1/4 shared", False).
_Part = tuple[str, bool]


@dataclass
class _Model:
    key: str
    name: str | None = None
    vendors: set[str] = field(default_factory=set)
    platforms: set[str] = field(default_factory=set)
    memory_gib: float = 0.0
    largest: int = 0  # accelerators the largest active offer lists; 0: no offers
    asks: list[_Level] = field(default_factory=list)  # cheapest first, at most depth
    # g CO2e per accelerator-hour of the asks at each price: (lowest, highest)
    carbon: dict[int, tuple[float, float]] = field(default_factory=dict)
    # Fractions: free parts by part and price -> [parts, offers].
    slices: dict[tuple[_Part, int], list[int]] = field(default_factory=dict)


@dataclass
class _BidGroup:
    """Open jobs with the same static needs: they join the same books. ``levels``
    are their limit prices, highest first."""

    min_memory_gib: float
    vendors: tuple[str, ...]
    models: tuple[str, ...]
    platforms: tuple[str, ...]
    # Limit prices, highest first, by how many accelerators each job needs.
    by_size: dict[int, list[_Level]] = field(default_factory=dict)
    # Jobs for part of one accelerator: limit prices, highest first, by part.
    by_part: dict[_Part, list[_Level]] = field(default_factory=dict)

    def accepts(self, m: _Model) -> bool:
        return (
            (not self.models or m.key in self.models)
            and (not self.vendors or bool(m.vendors.intersection(self.vendors)))
            and bool(m.platforms.intersection(self.platforms))
            and self.min_memory_gib <= m.memory_gib
        )


def order_book(session: Session, accelerator: str | None = None, depth: int = 50) -> OrderBook:
    key = resolve_model(accelerator) if accelerator else None
    models = _ask_side(session, key, depth)
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
    books = []
    for model in sorted(models.values(), key=lambda m: m.key):
        fits: list[list[_Level]] = []
        too_big: list[list[_Level]] = []
        parts: dict[_Part, list[list[_Level]]] = {}
        profiles = {p.name for p in mig.profiles(model.key)}
        for group in groups:
            if group.accepts(model):
                for size, levels in group.by_size.items():
                    (too_big if model.largest and size > model.largest else fits).append(levels)
                for part, levels in group.by_part.items():
                    # A fraction ("0.25") may go anywhere; a profile to its models.
                    if part[0].startswith("0.") or part[0] in profiles:
                        parts.setdefault(part, []).append(levels)
        book = _book(model, _best_levels(fits, depth), _best_levels(too_big, depth))
        book.slice_asks = _slice_asks(model, depth)
        book.slice_bids = _slice_bids(parts, depth)
        books.append(book)
    return OrderBook(books=books, generated_at=utcnow())


def _slice_asks(model: _Model, depth: int) -> list[SliceLevel]:
    """Free parts, cheapest first."""
    levels = [
        (price, part, parts, offers) for (part, price), (parts, offers) in model.slices.items()
    ]
    return _slice_levels(sorted(levels, key=lambda level: (level[0], level[1])), depth)


def _slice_bids(parts: dict[_Part, list[list[_Level]]], depth: int) -> list[SliceLevel]:
    """Bids for parts, highest first."""
    levels = [
        (price, part, quantity, orders)
        for part, sides in parts.items()
        for price, quantity, orders in _best_levels(sides, depth)
    ]
    return _slice_levels(sorted(levels, key=lambda level: (-level[0], level[1])), depth)


def _slice_levels(levels: list[tuple[int, _Part, int, int]], depth: int) -> list[SliceLevel]:
    """(price, part, quantity, orders) rows, in order, as the book shows them."""
    return [
        SliceLevel(
            part=part,
            isolated=isolated,
            price_per_hour=micros_to_usd(price),
            quantity=quantity,
            orders=orders,
        )
        for price, (part, isolated), quantity, orders in levels[:depth]
    ]


def _ask_side(session: Session, key: str | None, depth: int) -> dict[str, _Model]:
    """Each model's cheapest ``depth`` ask levels, and what its offers are."""
    condition = Offer.status == OfferStatus.active
    if key:
        condition = condition & (Offer.accelerator == key)
    models: dict[str, _Model] = {}
    kinds = (
        select(
            Offer.accelerator,
            Offer.vendor,
            Offer.platform,
            func.max(Offer.memory_gib),
            func.max(Offer.capacity),
        )
        .where(condition)
        .group_by(Offer.accelerator, Offer.vendor, Offer.platform)
    )
    for accel, vendor, platform, memory, largest in session.execute(kinds):
        if accel not in models:
            spec = catalog.lookup(accel)
            models[accel] = _Model(key=accel, name=spec.name if spec else None)
        model = models[accel]
        model.vendors.add(vendor)
        model.platforms.add(platform)
        model.memory_gib = max(model.memory_gib, memory)
        model.largest = max(model.largest, int(largest))
    _ask_slices(session, condition, models)
    # One level per price, whatever vendor or platform spelling the offers use; only
    # the levels shown leave the database. A MIG offer is no whole accelerator.
    condition = condition & (Offer.fraction_kind != FractionKind.mig)
    levels = (
        select(
            Offer.accelerator,
            Offer.price_per_hour_micros.label("price"),
            func.sum(Offer.count).label("quantity"),
            func.count().label("orders"),
            func.row_number()
            .over(partition_by=Offer.accelerator, order_by=Offer.price_per_hour_micros)
            .label("rank"),
        )
        .where(condition)
        .group_by(Offer.accelerator, Offer.price_per_hour_micros)
        .subquery()
    )
    stmt = (
        select(levels.c.accelerator, levels.c.price, levels.c.quantity, levels.c.orders)
        .where(levels.c.rank <= depth)
        .order_by(levels.c.accelerator, levels.c.price)
    )
    for accel, price, quantity, orders in session.execute(stmt):
        models[accel].asks.append((price, int(quantity), int(orders)))
    _ask_carbon(session, condition, models)
    return models


def _ask_slices(
    session: Session, condition: ColumnElement[bool], models: dict[str, _Model]
) -> None:
    """The free parts of fractional offers: each MIG (or partition) profile's free
    instances, and each shared offer's free shares, by price."""
    rows = session.execute(
        select(
            Offer.accelerator,
            Offer.price_per_hour_micros,
            Offer.fraction_kind,
            Offer.mig_instances,
            Offer.shares,
            Offer.capacity,
            Offer.shares_busy,
        ).where(condition & (Offer.fraction_kind != FractionKind.whole))
    )
    for accel, price, kind, instances, shares, capacity, busy in rows:
        model = models.get(accel)
        if model is None:
            continue
        if kind == FractionKind.mig:
            free: dict[_Part, int] = {}
            for text in instances:
                part = (text.partition("@")[0], True)
                free[part] = free.get(part, 0) + 1
        else:
            free = {(f"1/{shares} shared", False): max(0, capacity * shares - busy)}
        for part, n in free.items():
            level = model.slices.setdefault((part, price), [0, 0])
            level[0] += n
            level[1] += 1


def _ask_carbon(
    session: Session, condition: ColumnElement[bool], models: dict[str, _Model]
) -> None:
    """Each ask level's carbon per accelerator-hour, lowest and highest, as clearing
    counts it (power x PUE x the grid's intensity, the offers' stated figures or the
    defaults). Read by site, not by offer: offers of one model, price and place share
    their figures."""
    sites = (
        select(
            Offer.accelerator,
            Offer.price_per_hour_micros,
            Offer.vendor,
            Offer.country,
            Offer.region,
            Offer.power_w,
            Offer.pue,
            Offer.grid_g_per_kwh,
        )
        .where(condition)
        .distinct()
    )
    for accel, price, vendor, country, region, power_w, pue, grid_g in session.execute(sites):
        model = models.get(accel)
        if model is None:
            continue
        figures = grid.offer_energy(
            vendor, accel, country, region, power_w=power_w, pue=pue, grid_g_per_kwh=grid_g
        )
        g = figures["power_w"] * figures["pue"] / 1000 * figures["grid_g_per_kwh"]
        low, high = model.carbon.get(price, (g, g))
        model.carbon[price] = (min(low, g), max(high, g))


def _bid_groups(session: Session) -> list[_BidGroup]:
    """Open jobs, grouped by everything that decides which books they join, with their
    limit prices. The lists are read as JSON text and decoded once per distinct value:
    thousands of rows share a handful of them."""
    needs = (
        Job.min_memory_gib,
        cast(Job.vendors, Text),
        cast(Job.accelerator_models, Text),
        cast(Job.platforms, Text),
    )
    stmt = (
        select(
            needs[0],
            needs[1],
            needs[2],
            needs[3],
            Job.max_price_per_hour_micros,
            Job.accelerators,
            Job.fraction_milli,
            Job.mig_profile,
            Job.accepts_shared,
            func.sum(Job.accelerators),
            func.count(),
        )
        .where(Job.state == JobState.open)
        .group_by(
            *needs,
            Job.accelerators,
            Job.fraction_milli,
            Job.mig_profile,
            Job.accepts_shared,
            Job.max_price_per_hour_micros,
        )
        .order_by(Job.max_price_per_hour_micros.desc())
    )
    decoded: dict[str, tuple[str, ...]] = {}

    def decode(text: str) -> tuple[str, ...]:
        if text not in decoded:
            decoded[text] = tuple(json.loads(text))
        return decoded[text]

    groups: dict[tuple[float, str, str, str], _BidGroup] = {}
    rows = session.execute(stmt)
    for memory, vendors, models, platforms, price, size, milli, profile, shared, n, jobs in rows:
        group = (memory, vendors, models, platforms)
        if group not in groups:
            groups[group] = _BidGroup(memory, decode(vendors), decode(models), decode(platforms))
        if milli is None and profile is None:
            levels = groups[group].by_size.setdefault(int(size), [])
            levels.append((price, int(n), int(jobs)))
            continue
        what = profile if profile is not None else f"{(milli or 0) / 1000:g}"
        part = (what, not shared)
        groups[group].by_part.setdefault(part, []).append((price, int(jobs), int(jobs)))
    return list(groups.values())


def _best_levels(sides: Iterable[list[_Level]], depth: int) -> list[_Level]:
    """The ``depth`` highest prices over several highest-first lists, equal prices summed."""
    best: list[_Level] = []
    for price, quantity, orders in heapq.merge(*sides, key=lambda level: -level[0]):
        if best and best[-1][0] == price:
            _, q, n = best[-1]
            best[-1] = (price, q + quantity, n + orders)
        elif len(best) == depth:
            break
        else:
            best.append((price, quantity, orders))
    return best


def _levels(
    levels: list[_Level], carbon: dict[int, tuple[float, float]] | None = None
) -> list[PriceLevel]:
    out = []
    for price, q, n in levels:
        low, high = (carbon or {}).get(price, (None, None))
        out.append(
            PriceLevel(
                price_per_hour=micros_to_usd(price),
                quantity=q,
                orders=n,
                gco2_per_hour_min=low,
                gco2_per_hour_max=high,
            )
        )
    return out


def _book(model: _Model, bid_levels: list[_Level], unfillable: list[_Level]) -> Book:
    asks, bids = _levels(model.asks, model.carbon), _levels(bid_levels)
    best_ask = asks[0].price_per_hour if asks else None
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
        asks=asks,
        bids=bids,
        unfillable=_levels(unfillable),
        largest_offer=model.largest or None,
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
