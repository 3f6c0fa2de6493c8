"""Offer operations. Functions take the session and never commit."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

from sqlalchemy import ColumnElement, Integer, Select, bindparam, func, select
from sqlalchemy.orm import Session

from adapters import catalog, mig
from broker import ledger
from broker.accounts.visibility import changeable_offers, owns, sees_all
from broker.config import get_settings
from broker.db import new_id, utcnow
from broker.errors import Conflict, InvalidInput, NotFound
from broker.models.account import Account
from broker.models.offer import FractionKind, Offer, OfferStatus
from broker.money import usd_to_micros
from broker.offers.schemas import OfferCreate, OfferQuery, OfferSort, OfferTerms, OfferUpdate
from solver.fractions import parse_instance

_HARDWARE_FIELDS = ("vendor", "platform", "memory_gib", "tflops_bf16", "tflops_fp32", "mem_bw_gbps")
_PEAK_FIELDS = ("memory_gib", "tflops_bf16", "tflops_fp32", "mem_bw_gbps")


def resolve_model(name: str) -> str:
    """The catalog key for a model name or alias; other names are normalised as they are."""
    spec = catalog.lookup(name)
    return spec.key if spec else catalog.normalize_key(name)


def check_emulation(data: OfferTerms) -> None:
    """Emulated capacity only on a broker that allows it (a demo), never by surprise."""
    if data.emulated and not get_settings().allow_emulation:
        raise InvalidInput(
            "this broker does not accept emulated capacity (it is for demos: start the "
            "broker with BROKER_ALLOW_EMULATION=1)",
            field="body.emulated",
        )


def create_offer(session: Session, provider: Account, data: OfferCreate) -> Offer:
    check_emulation(data)
    hardware = hardware_figures(data)
    fraction = fraction_terms(
        data, str(hardware["accelerator"]), float(str(hardware["memory_gib"]))
    )
    offer = Offer(
        id=new_id("off"),
        provider_id=provider.id,
        status=OfferStatus.active,
        count=data.count,
        capacity=data.count,
        price_per_hour_micros=usd_to_micros(data.price_per_hour),
        region=data.region,
        country=data.country,
        lat=data.lat,
        lon=data.lon,
        available_hours=data.available_hours,
        efficiency=data.efficiency,
        emulated=data.emulated,
        power_w=data.power_w,
        pue=data.pue,
        grid_g_per_kwh=data.grid_g_per_kwh,
        startup_seconds=data.startup_seconds,
        transfer_s_per_gb=data.transfer_s_per_gb,
        compile_s_per_kb=data.compile_s_per_kb,
        **hardware,
        **fraction,
    )
    session.add(offer)
    session.flush()
    return offer


def fraction_terms(data: OfferTerms, model: str, memory_gib: float) -> dict[str, Any]:
    """The columns of what the offer sells of each accelerator (docs/market.md,
    fractions), checked; each error names the field to fix."""
    if data.kind != FractionKind.shared:
        for name in ("shares", "memory_per_share_gib"):
            if getattr(data, name) is not None:
                raise InvalidInput(
                    f"{name} is for shared offers (kind shared)", field=f"body.{name}"
                )
    if data.kind != FractionKind.mig and data.mig_instances:
        raise InvalidInput("mig_instances is for MIG offers (kind mig)", field="body.mig_instances")
    if data.kind == FractionKind.whole:
        return {"fraction_kind": FractionKind.whole}
    if data.kind == FractionKind.shared:
        if data.shares is None:
            raise InvalidInput(
                "a shared offer says how many shares each accelerator is cut into (shares)",
                field="body.shares",
            )
        if data.memory_per_share_gib is None:
            raise InvalidInput(
                "a shared offer says the memory each share may use (memory_per_share_gib): "
                "jobs are capped to it",
                field="body.memory_per_share_gib",
            )
        if data.shares * data.memory_per_share_gib > memory_gib * (1 + 1e-9):
            raise InvalidInput(
                f"{data.shares} shares of {data.memory_per_share_gib:g} GiB are more than the "
                f"accelerator's {memory_gib:g} GiB",
                field="body.memory_per_share_gib",
            )
        return {
            "fraction_kind": FractionKind.shared,
            "shares": data.shares,
            "memory_per_share_gib": data.memory_per_share_gib,
        }
    profiles = {p.name: p for p in mig.profiles(model)}
    if not profiles:
        having = ", ".join(mig.models())
        raise InvalidInput(
            f"{model} has no MIG profiles; MIG offers are for {having}", field="body.kind"
        )
    if data.count != 1:
        raise InvalidInput("a MIG offer is one GPU: count 1", field="body.count")
    taken: set[int] = set()
    for text in data.mig_instances:
        name, start = parse_instance(text)
        profile = profiles.get(name)
        if profile is None:
            raise InvalidInput(
                f"MIG instance {text}: {model} has no profile {name} (it has "
                f"{', '.join(profiles)})",
                field="body.mig_instances",
            )
        slots = profile.slots(start)
        if start not in profile.starts or slots & taken:
            raise InvalidInput(
                f"MIG instance {text}: {name} may start at "
                f"{', '.join(str(s) for s in profile.starts)}, on slots no other instance covers",
                field="body.mig_instances",
            )
        taken |= slots
    if mig.partitioned_whole(model):
        names = {parse_instance(t)[0] for t in data.mig_instances}
        if len(names) != 1:
            raise InvalidInput(
                f"an {model} is partitioned whole, in one mode: list its partitions, all of "
                f"one profile ({', '.join(profiles)})",
                field="body.mig_instances",
            )
    return {"fraction_kind": FractionKind.mig, "mig_instances": sorted(data.mig_instances)}


def hardware_figures(data: OfferTerms) -> dict[str, object]:
    """Fill hardware figures from the catalog; explicit figures override it.

    Vendor and platform are facts of the model, so a mismatch is refused rather
    than overridden; throughput and memory may be lower (power caps, partitions)
    but never above the model's datasheet: inflated figures would win matches
    with runtime estimates near zero. The catalog's ``host`` rows (the CPU) are
    one machine's measurement, not a datasheet, and bound nothing.
    """
    spec = catalog.lookup(data.accelerator)
    given = {f: getattr(data, f) for f in _HARDWARE_FIELDS if getattr(data, f) is not None}
    if spec is None:
        missing = [f for f in _HARDWARE_FIELDS if f not in given]
        if missing:
            raise InvalidInput(
                f"{data.accelerator!r} is not in the hardware catalog, so the offer must give "
                f"{', '.join(missing)} (see GET /v1/catalog for the known models)",
                field=f"body.{missing[0]}",
            )
        return {"accelerator": catalog.normalize_key(data.accelerator), **given}
    for fact in ("vendor", "platform"):
        if fact in given and given[fact] != getattr(spec, fact):
            raise InvalidInput(
                f"{spec.key} is a {getattr(spec, fact)} {fact} model, not {given[fact]}",
                field=f"body.{fact}",
            )
    if spec.form_factor != "host":
        for name in _PEAK_FIELDS:
            claimed, peak = given.get(name), getattr(spec, name)
            if isinstance(claimed, int | float) and claimed > peak * (1 + 1e-9):
                raise InvalidInput(
                    f"{name} {claimed:g} is more than the {spec.name}'s datasheet figure "
                    f"({peak:g}, {spec.source}): an offer may state less, never more",
                    field=f"body.{name}",
                )
        if (
            data.power_w is not None
            and spec.tdp_w
            and not (0.3 * spec.tdp_w <= data.power_w <= spec.tdp_w * (1 + 1e-9))
        ):
            # Less power looks cleaner: a claim far under the datasheet is refused too.
            raise InvalidInput(
                f"power_w {data.power_w:g} is outside 30 % to 100 % of the {spec.name}'s "
                f"TDP ({spec.tdp_w:g} W, {spec.source})",
                field="body.power_w",
            )
    figures = {f: getattr(spec, f) for f in _HARDWARE_FIELDS}
    return {"accelerator": spec.key, **figures, **given}


def get_visible_offer(session: Session, viewer: Account, offer_id: str) -> Offer:
    """An offer the viewer may read: any active offer, its own, or any for an admin.

    Others answer 404, so ids of withdrawn offers do not leak.
    """
    offer = session.get(Offer, offer_id)
    if offer is None or not (offer.status == OfferStatus.active or owns(viewer, offer.provider_id)):
        raise NotFound(f"no offer {offer_id!r}")
    return offer


def get_own_offer(session: Session, owner: Account, offer_id: str, *, lock: bool = False) -> Offer:
    """An offer the caller may change: its own, or any for an admin."""
    stmt = changeable_offers(owner).where(Offer.id == offer_id)
    if lock:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    offer = session.scalar(stmt)
    if offer is None:
        raise NotFound(f"no offer {offer_id!r} of yours")
    return offer


def update_offer(session: Session, owner: Account, offer_id: str, data: OfferUpdate) -> Offer:
    offer = get_own_offer(session, owner, offer_id, lock=True)
    if offer.status != OfferStatus.active:
        raise Conflict(f"offer {offer_id} is {offer.status.value}; list a new offer instead")
    changes = data.model_dump(exclude_unset=True)
    for name in ("price_per_hour", "capacity", "efficiency"):
        if name in changes and changes[name] is None:
            raise InvalidInput(f"{name} cannot be null", field=f"body.{name}")
    if "price_per_hour" in changes:
        offer.price_per_hour_micros = usd_to_micros(changes.pop("price_per_hour"))
    if "capacity" in changes:
        ledger.resize_offer(offer, changes.pop("capacity"))
    for name, value in changes.items():
        setattr(offer, name, value)
    offer.updated_at = utcnow()
    session.flush()
    return offer


def withdraw_offer(session: Session, owner: Account, offer_id: str) -> Offer:
    """Take an offer off the market. Withdrawing twice is harmless.

    Jobs matched to it but not yet running go back to the order book.
    """
    offer = get_own_offer(session, owner, offer_id, lock=True)
    # Matches that have not started go back to the book; running jobs finish.
    ledger.withdraw_offer(session, offer)
    return offer


def search_offers(
    session: Session, viewer: Account, filters: OfferQuery
) -> tuple[list[Offer], int]:
    """The page of offers ``viewer`` may see that match ``filters``, and how many match
    in all."""
    rows, total = _search(session, viewer, filters, _ORM_OFFERS)
    return [row[0] for row in rows], total


def search_offer_rows(
    session: Session, viewer: Account, filters: OfferQuery, columns: Select[Any]
) -> tuple[list[tuple[Any, ...]], int]:
    """``search_offers`` as plain rows of ``columns``: no ORM objects, for the API's busy
    search. ``columns`` is a select of the offers table's columns, built once (its
    statements are kept for it)."""
    return _search(session, viewer, filters, columns)


# Searches select and filter the table's columns, not the ORM class's attributes, so a
# select of plain columns stays Core.
_offers = Offer.__table__
_ORM_OFFERS = select(Offer)
_ORDER: dict[OfferSort, tuple[ColumnElement[Any], ...]] = {
    OfferSort.price_asc: (_offers.c.price_per_hour_micros.asc(), _offers.c.id.asc()),
    OfferSort.price_desc: (_offers.c.price_per_hour_micros.desc(), _offers.c.id.asc()),
    OfferSort.newest: (_offers.c.created_at.desc(), _offers.c.id.asc()),
}
# Each condition a search may have, made for the parameter of its name.
_CONDITIONS: dict[str, Callable[[ColumnElement[Any]], ColumnElement[bool]]] = {
    "owner": lambda p: _offers.c.provider_id == p,
    # Others' withdrawn offers are private: active ones are on the market for anyone.
    "viewer": lambda p: (_offers.c.status == OfferStatus.active) | (_offers.c.provider_id == p),
    "status": lambda p: _offers.c.status == p,
    "vendor": lambda p: _offers.c.vendor == p,
    "accelerator": lambda p: _offers.c.accelerator == p,
    "platform": lambda p: _offers.c.platform == p,
    "min_memory_gib": lambda p: _offers.c.memory_gib >= p,
    "min_count": lambda p: _offers.c.count >= p,
    "region": lambda p: _offers.c.region == p,
    "country": lambda p: _offers.c.country == p,
    "max_price": lambda p: _offers.c.price_per_hour_micros <= p,
    "kind": lambda p: _offers.c.fraction_kind == p,
}


def _search(
    session: Session, viewer: Account, filters: OfferQuery, columns: Select[Any]
) -> tuple[list[tuple[Any, ...]], int]:
    params = _parameters(viewer, filters)
    page, count = _statements(columns, filters.sort, frozenset(params))
    rows = session.execute(page, {**params, "limit": filters.limit, "offset": filters.offset}).all()
    if rows:
        return [row[:-1] for row in rows], rows[0][-1]  # each row ends with the total
    if filters.offset == 0:
        return [], 0  # none match
    return [], session.scalar(count, params) or 0  # a page past the last one


def _parameters(viewer: Account, f: OfferQuery) -> dict[str, Any]:
    """The search's values, by the name of their condition (``_CONDITIONS``)."""
    if f.mine:
        visibility = {"owner": viewer.id}
    elif not sees_all(viewer) and f.status != OfferStatus.active:
        visibility = {"viewer": viewer.id}  # a search for active offers needs no such condition
    else:
        visibility = {}
    given = {
        "status": f.status,
        "vendor": f.vendor or None,
        "accelerator": resolve_model(f.accelerator) if f.accelerator else None,
        "platform": f.platform or None,
        "min_memory_gib": f.min_memory_gib,
        "min_count": f.min_count,
        "region": f.region or None,
        "country": f.country or None,
        "max_price": None if f.max_price is None else usd_to_micros(f.max_price),
        "kind": f.kind,
    }
    return visibility | {name: value for name, value in given.items() if value is not None}


@lru_cache(maxsize=256)
def _statements(
    columns: Select[Any], sort: OfferSort, conditions: frozenset[str]
) -> tuple[Select[Any], Select[Any]]:
    """A search's page and count, with its values as parameters, for one shape of search.

    Built once per shape (which conditions, which sort), so that SQLAlchemy finds the
    compiled statement without building and walking a new one on every request.
    """
    where = [make(bindparam(name)) for name, make in _CONDITIONS.items() if name in conditions]
    count = select(func.count()).select_from(_offers).where(*where)
    # The total comes with each row, from a subquery the database runs once: one
    # statement, where a page and a count would take two.
    page = (
        columns.add_columns(count.scalar_subquery())
        .where(*where)
        .order_by(*_ORDER[sort])
        .limit(bindparam("limit", type_=Integer))
        .offset(bindparam("offset", type_=Integer))
    )
    return page, count
