"""Where a service's next replicas go, from the offers free now (``solver.services``).

Two needs, in order:

1. **Coverage.** User regions with no placed replica within the SLO get replicas:
   the cheapest set of offers that brings each of them within the SLO (a small
   facility-location problem, ``solver.services.place``), at most up to
   ``max_replicas``. A region no allowed offer can serve is named in the note.
2. **Load.** Replicas the autoscaler wants beyond those go, one at a time, near the
   region with the most of the traffic per replica within its SLO.

The plan is a list of offers, one per replica to open; ``reconcile`` pins each
open replica job to one (``Job.pinned_offer_id``), and the round's solve honours
the pin as one more rule (``placement``). Planning apart from the round's solve
keeps that solve as it is for the many jobs; the service's own problem is a few
regions by the offers free, solved in milliseconds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.market import adapt
from broker.models.offer import FractionKind, Offer, OfferStatus
from broker.models.service import Service
from broker.money import MICROS_PER_USD
from solver import market as sm
from solver import services as ss

NOWHERE = "-"  # a pin no offer has: the replica waits (the placement note says why)

FreeOffers = list[sm.Offer]


class _Place(Protocol):
    @property
    def lat(self) -> float: ...
    @property
    def lon(self) -> float: ...


@dataclass(frozen=True)
class Plan:
    pins: list[str]  # an offer id per replica to open
    note: str | None  # why some region, or some replica, could not be placed


def free_offers(session: Session) -> FreeOffers:
    """Active whole-accelerator offers with one free, as the solver sees them."""
    rows = session.execute(
        select(*adapt.OFFER_COLUMNS, Offer.count.label("free")).where(
            Offer.status == OfferStatus.active,
            Offer.count > 0,
            Offer.fraction_kind == FractionKind.whole,
        )
    )
    return [adapt.offer(r, r.free) for r in rows]


def _regions(service: Service) -> list[dict[str, Any]]:
    return list(service.users)


def region_name(service: Service, index: int) -> str:
    u = service.users[index]
    return str(u.get("name") or f"{u['lat']:.1f},{u['lon']:.1f}")


def _near(service: Service, user: dict[str, Any], at: _Place) -> bool:
    return ss.rtt_ms(user["lat"], user["lon"], at.lat, at.lon) <= service.latency_slo_ms


def redundant(service: Service, offer: _Place, others: Sequence[_Place]) -> bool:
    """Whether every region ``offer`` brings within the SLO has another of ``others``."""
    return all(
        not _near(service, u, offer) or any(_near(service, u, o) for o in others)
        for u in _regions(service)
    )


def _solver_service(
    service: Service, users: list[dict[str, Any]], count: tuple[int, int]
) -> ss.Service:
    return ss.Service(
        id=service.id,
        users=tuple(ss.UserRegion(u["lat"], u["lon"], float(u.get("share", 1.0))) for u in users),
        latency_slo_ms=service.latency_slo_ms,
        platforms=tuple(service.platforms),
        max_price_per_hour=service.max_price_per_hour_micros / MICROS_PER_USD,
        min_replicas=count[0],
        max_replicas=count[1],
        allowed_countries=tuple(service.allowed_countries),
    )


def take(offers: FreeOffers, replicas: dict[str, int]) -> FreeOffers:
    """``offers`` less the accelerators ``replicas`` (offer id: count) take."""
    return [replace(o, count=o.count - replicas.get(o.id, 0)) for o in offers]


def _pins(replicas: dict[str, int]) -> list[str]:
    return [offer_id for offer_id, n in sorted(replicas.items()) for _ in range(n)]


def plan(service: Service, placed: Sequence[_Place], market: FreeOffers) -> Plan:
    """The offers for the replicas to open now: coverage first, then load (see module)."""
    users = _regions(service)
    at: list[_Place] = list(placed)
    uncovered = [i for i, u in enumerate(users) if not any(_near(service, u, o) for o in at)]
    room = service.max_replicas - len(at)
    pins: list[str] = []
    notes: list[str] = []
    offers = list(market)
    if uncovered and room <= 0:
        names = ", ".join(region_name(service, i) for i in uncovered)
        notes.append(f"{names}: no replica within the SLO, and max_replicas are placed")
    elif uncovered:
        wanted = [users[i] for i in uncovered]
        cover = ss.place(_solver_service(service, wanted, (1, room)), offers)
        for k, why in sorted(cover.unserved.items()):
            notes.append(f"{region_name(service, uncovered[k])}: {why}")
        pins += _pins(cover.replicas)
        offers = take(offers, cover.replicas)
        at += [o for o in offers if o.id in cover.replicas]
    extra = min(service.desired_replicas, service.max_replicas) - len(placed) - len(pins)
    for _ in range(max(0, extra)):
        pin = _one_more(service, at, offers)
        if pin is None:
            notes.append(f"no free offer it may use for {extra} more replica(s) near its users")
            break
        pins.append(pin.id)
        offers = take(offers, {pin.id: 1})
        at.append(pin)
    return Plan(pins, "; ".join(notes) or None)


def _one_more(service: Service, at: Sequence[_Place], offers: FreeOffers) -> sm.Offer | None:
    """One more replica, near the region with the most traffic per replica within its
    SLO; where none may go near it, the next such region."""
    users = _regions(service)
    load = Counter(
        {
            i: float(u.get("share", 1.0)) / (1 + sum(_near(service, u, o) for o in at))
            for i, u in enumerate(users)
        }
    )
    for i, _ in load.most_common():
        one = ss.place(_solver_service(service, [users[i]], (1, 1)), offers)
        if one.replicas:
            offer_id = next(iter(one.replicas))
            return next(o for o in offers if o.id == offer_id)
    return None
