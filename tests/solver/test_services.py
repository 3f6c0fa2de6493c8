"""Where a service's replicas go (solver/services.py): by latency to its users, at least
cost, never outside its countries; checked against every layout on small markets."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from solver.market import Offer
from solver.services import Service, UserRegion, allowed, place, rtt_ms

# Region coordinates as in benchmarks/data/regions.csv (published metro locations).
PLACES = {
    "us-east": (38.9, -77.0, "US"),
    "eu-west": (53.3, -6.3, "IE"),
    "eu-central": (50.1, 8.7, "DE"),
    "af-south": (-33.9, 18.4, "ZA"),
    "ap-south": (19.1, 72.9, "IN"),
}
LAGOS = UserRegion(6.5, 3.4)
NEW_YORK = UserRegion(40.7, -74.0)
FRANKFURT = UserRegion(50.1, 8.7)


def offer(region: str, price: float, count: int = 2, platform: str = "cpu") -> Offer:
    lat, lon, country = PLACES[region]
    return Offer(
        id=f"{region}-{price}",
        vendor="cpu",
        accelerator="cpu",
        platform=platform,
        count=count,
        memory_gib=16.0,
        tflops_bf16=1.0,
        tflops_fp32=1.0,
        mem_bw_gbps=50.0,
        price_per_hour=price,
        region=region,
        country=country,
        lat=lat,
        lon=lon,
    )


def service(users: tuple[UserRegion, ...], slo: float, **kw: object) -> Service:
    fields: dict[str, object] = {"platforms": ("cpu",), "max_price_per_hour": 5.0} | kw
    return Service("svc", users, slo, **fields)  # type: ignore[arg-type]


OFFERS = (offer("us-east", 1.0), offer("eu-central", 1.5), offer("eu-west", 1.2))


def test_users_on_two_continents_get_a_replica_on_each_when_the_slo_needs_it() -> None:
    plan = place(service((NEW_YORK, FRANKFURT), slo=40), OFFERS)
    assert plan.replicas == {"us-east-1.0": 1, "eu-west-1.2": 1}  # the cheaper of Europe's
    assert plan.unserved == {}
    assert all(ms <= 40 for _, ms in plan.served.values())
    assert plan.cost_per_hour == pytest.approx(2.2)


def test_one_replica_when_one_serves_everyone_within_the_slo() -> None:
    plan = place(service((NEW_YORK, FRANKFURT), slo=150), OFFERS)
    assert plan.replicas == {"us-east-1.0": 1}  # New York-Frankfurt is about 62 ms
    assert plan.cost_per_hour == pytest.approx(1.0)


def test_never_a_replica_outside_the_allowed_countries() -> None:
    plan = place(service((NEW_YORK, FRANKFURT), slo=150, allowed_countries=("DE",)), OFFERS)
    assert set(plan.replicas) == {"eu-central-1.5"}
    assert plan.unserved == {}


def test_a_region_no_offer_can_serve_is_explained() -> None:
    plan = place(service((LAGOS, FRANKFURT), slo=30), OFFERS)
    assert set(plan.replicas) == {"eu-west-1.2"}  # Dublin serves Frankfurt in 11 ms
    assert 0 in plan.unserved
    assert "within 30 ms: the nearest (eu-" in plan.unserved[0]
    assert 1 in plan.served


def test_min_replicas_adds_the_cheapest() -> None:
    plan = place(service((NEW_YORK,), slo=150, min_replicas=3), OFFERS)
    assert sum(plan.replicas.values()) == 3
    assert plan.replicas["us-east-1.0"] == 2  # both of its free accelerators first
    assert plan.cost_per_hour == pytest.approx(1.0 * 2 + 1.2)


def test_nothing_usable_is_said() -> None:
    plan = place(service((NEW_YORK,), slo=150, platforms=("tpu",)), OFFERS)
    assert plan.status == "INFEASIBLE"
    assert "no offer it may use" in plan.unserved[0]


def test_round_trips_follow_the_market_rule() -> None:
    # London to New York is about 5,570 km: 55.7 ms there and back at 100 km per ms.
    assert rtt_ms(51.5, -0.13, 40.7, -74.0) == pytest.approx(55.7, abs=0.5)


def _best(svc: Service, offers: tuple[Offer, ...]) -> float | None:
    """The least cost of any layout that serves every region some offer can serve."""
    usable = [o for o in offers if allowed(svc, o)]
    servable = [
        u
        for u in svc.users
        if any(rtt_ms(u.lat, u.lon, o.lat, o.lon) <= svc.latency_slo_ms for o in usable)
    ]
    best: float | None = None
    for counts in itertools.product(*(range(min(o.count, svc.max_replicas) + 1) for o in usable)):
        n = sum(counts)
        if n > svc.max_replicas or n < min(svc.min_replicas, sum(o.count for o in usable)):
            continue
        open_ = [o for o, c in zip(usable, counts, strict=True) if c]
        if all(
            any(rtt_ms(u.lat, u.lon, o.lat, o.lon) <= svc.latency_slo_ms for o in open_)
            for u in servable
        ):
            cost = sum(o.price_per_hour * c for o, c in zip(usable, counts, strict=True))
            best = cost if best is None else min(best, cost)
    return best


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(sorted(PLACES)), st.sampled_from([0.8, 1.0, 1.3, 2.0])),
        min_size=1,
        max_size=4,
    ),
    st.lists(st.sampled_from([LAGOS, NEW_YORK, FRANKFURT]), min_size=1, max_size=3),
    st.sampled_from([20.0, 60.0, 120.0, 400.0]),
    st.integers(1, 3),
)
def test_small_services_are_placed_at_least_cost(
    places: list[tuple[str, float]], users: list[UserRegion], slo: float, minimum: int
) -> None:
    offers = tuple(
        offer(region, price, count=1) for region, price in dict.fromkeys(places)
    )  # fmt: skip
    offers = tuple({o.id: o for o in offers}.values())
    svc = service(tuple(users), slo, min_replicas=minimum, max_replicas=4)
    plan = place(svc, offers)
    best = _best(svc, offers)
    assert best is not None  # at least one offer, and max_replicas >= offers here
    assert plan.cost_per_hour == pytest.approx(best)
    for offer_id, ms in plan.served.values():
        assert ms <= slo
        assert plan.replicas.get(offer_id, 0) >= 1
    assert len(plan.served) + len(plan.unserved) == len(users)
