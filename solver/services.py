"""Where a service's replicas go: a small facility-location problem (issue 26, placement).

A service is a standing bid for replicas of one program, each on one accelerator,
for users in several places. Each user region must reach a replica within the
service's latency SLO (the market's round-trip rule: great-circle distance over
100 km per millisecond) wherever some allowed offer is that close; among the
layouts that do, the round takes the cheapest, then the one nearest its users.

    min  sum_o price_o * y_o  +  eps * sum_{u,o} share_u * rtt(u, o) * x_{u,o}
    s.t. sum_o x_{u,o} = 1            for every region u some offer can serve
         x_{u,o} <= y_o               (a region is served by an offer with a replica)
         min_replicas <= sum_o y_o <= max_replicas
         0 <= y_o <= free accelerators of o;  x_{u,o} = 0 when rtt(u, o) > SLO

Offers a service may not use (platform, country, price, none free) are left out
first. A region no allowed offer can serve within the SLO is not served, and
the plan says why, with the nearest allowed offer's round trip. This module is
the placement alone: the broker's service model, serving and autoscaling are
not built yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ortools.sat.python import cp_model

from solver.market import Offer
from solver.rules import EARTH_RADIUS_KM, KM_PER_MS_ROUND_TRIP

SCALE = 1_000_000  # integer units per USD an hour
NEAR_USD_PER_MS = 1e-4  # the distance term: ties between equal-cost layouts, nothing more


@dataclass(frozen=True, slots=True)
class UserRegion:
    lat: float
    lon: float
    share: float = 1.0  # of the service's requests


@dataclass(frozen=True, slots=True)
class Service:
    id: str
    users: tuple[UserRegion, ...]
    latency_slo_ms: float
    platforms: tuple[str, ...]
    max_price_per_hour: float
    min_replicas: int = 1
    max_replicas: int = 8
    allowed_countries: tuple[str, ...] = ()  # empty: any


@dataclass(frozen=True, slots=True)
class Plan:
    """Replicas per offer, which offer serves each user region and at what round
    trip, the regions not served with the reason, and the cost an hour."""

    replicas: dict[str, int]
    served: dict[int, tuple[str, float]]  # region index -> (offer id, rtt ms)
    unserved: dict[int, str]  # region index -> why
    cost_per_hour: float
    status: str  # OPTIMAL, FEASIBLE, or INFEASIBLE (nothing may be placed)


def rtt_ms(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """The market's round trip between two places, in milliseconds."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dlat, dlon = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dlat / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dlon / 2) ** 2
    km = 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))
    return km / KM_PER_MS_ROUND_TRIP


def allowed(service: Service, offer: Offer) -> bool:
    return (
        offer.count > 0
        and offer.platform in service.platforms
        and offer.price_per_hour <= service.max_price_per_hour
        and (not service.allowed_countries or offer.country in service.allowed_countries)
    )


def place(service: Service, offers: Sequence[Offer], time_limit: float = 2.0) -> Plan:
    """The cheapest replicas that bring every region it can within the SLO."""
    usable = [o for o in offers if allowed(service, o)]
    if not usable or service.max_replicas < 1:
        why = "no offer it may use (platform, country, price, a free accelerator)"
        return Plan({}, {}, dict.fromkeys(range(len(service.users)), why), 0.0, "INFEASIBLE")
    rtt = [[rtt_ms(u.lat, u.lon, o.lat, o.lon) for o in usable] for u in service.users]
    unserved: dict[int, str] = {}
    for u, row in enumerate(rtt):
        if min(row) > service.latency_slo_ms:
            nearest = min(range(len(usable)), key=lambda k: row[k])
            unserved[u] = (
                f"no offer it may use is within {service.latency_slo_ms:g} ms: the nearest "
                f"({usable[nearest].region}) is {row[nearest]:.0f} ms away"
            )
    model = cp_model.CpModel()
    y = [
        model.new_int_var(0, min(o.count, service.max_replicas), f"y{k}")
        for k, o in enumerate(usable)
    ]
    opened = [model.new_bool_var(f"open{k}") for k in range(len(usable))]
    for k in range(len(usable)):
        model.add(y[k] >= 1).only_enforce_if(opened[k])
        model.add(y[k] == 0).only_enforce_if(~opened[k])
    x: dict[tuple[int, int], cp_model.IntVar] = {}
    for u, row in enumerate(rtt):
        if u in unserved:
            continue
        near = [k for k, ms in enumerate(row) if ms <= service.latency_slo_ms]
        for k in near:
            x[u, k] = model.new_bool_var(f"x{u}_{k}")
            model.add_implication(x[u, k], opened[k])
        model.add_exactly_one(x[u, k] for k in near)
    total = sum(y)
    model.add(
        total >= min(service.min_replicas, sum(min(o.count, service.max_replicas) for o in usable))
    )
    model.add(total <= service.max_replicas)
    cost = [round(o.price_per_hour * SCALE) * y[k] for k, o in enumerate(usable)]
    near_cost = [
        round(NEAR_USD_PER_MS * service.users[u].share * rtt[u][k] * SCALE) * v
        for (u, k), v in x.items()
    ]
    model.minimize(sum(cost) + sum(near_cost))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit
    solver.parameters.num_workers = 1
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        why = f"no {service.min_replicas} to {service.max_replicas} replicas serve it"
        return Plan({}, {}, dict.fromkeys(range(len(service.users)), why), 0.0, "INFEASIBLE")
    replicas = {usable[k].id: solver.value(y[k]) for k in range(len(usable)) if solver.value(y[k])}
    served = {u: (usable[k].id, rtt[u][k]) for (u, k), v in x.items() if solver.value(v)}
    cost_per_hour = sum(usable[k].price_per_hour * solver.value(y[k]) for k in range(len(usable)))
    name = "OPTIMAL" if status == cp_model.OPTIMAL else "FEASIBLE"
    return Plan(replicas, served, unserved, cost_per_hour, name)
