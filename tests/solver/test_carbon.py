"""Energy and carbon in clearing: the formulas, the cap as a rule, and a carbon
price that trades money for emissions the way the developer asked."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings

from solver import Job, Market, Offer, Weights, solve
from solver.market import Result
from tests.solver import reference
from tests.solver.strategies import markets

SLOW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _offer(oid: str, grid: float, price: float = 2.0, **kw: object) -> Offer:
    base: dict[str, object] = dict(
        id=oid,
        vendor="nvidia",
        accelerator="h100-sxm",
        platform="cuda",
        count=4,
        memory_gib=80,
        tflops_bf16=989,
        tflops_fp32=67,
        mem_bw_gbps=3350,
        price_per_hour=price,
        region="r-" + oid,
        country="SE",
        lat=59.3,
        lon=18.1,
        power_w=700.0,
        pue=1.1,
        grid_g_per_kwh=grid,
    )
    base.update(kw)
    return Offer(**base)  # type: ignore[arg-type]


def _job(jid: str = "j", **kw: object) -> Job:
    return Job(jid, ("cuda",), 5.0, accelerators=2, duration_hours=3.0, **kw)  # type: ignore[arg-type]


def test_energy_and_carbon_by_hand() -> None:
    market = Market(offers=(_offer("o", grid=400.0),), jobs=(_job(),), weights=Weights())
    [a] = solve(market).assignments
    assert a.energy_kwh == pytest.approx(0.7 * 1.1 * 2 * 3.0)  # kW x PUE x accelerators x h
    assert a.gco2 == pytest.approx(0.7 * 1.1 * 2 * 3.0 * 400.0)
    assert a.carbon_usd == 0.0  # no carbon price
    priced = replace(market, weights=Weights(carbon_usd_per_t=100.0))
    [b] = solve(priced).assignments
    assert b.carbon_usd == pytest.approx(b.gco2 * 100.0 / 1e6)
    assert b.cost == pytest.approx(b.compute_usd + b.carbon_usd)
    own = replace(market, jobs=(_job(carbon_usd_per_t=1000.0),), weights=Weights(100.0))
    [c] = solve(own).assignments
    assert c.carbon_usd == pytest.approx(c.gco2 * 1000.0 / 1e6)  # the job's price wins


def test_a_carbon_cap_rules_out_dirty_offers() -> None:
    market = Market(
        offers=(_offer("dirty", grid=800.0, price=1.0), _offer("clean", grid=20.0, price=3.0)),
        jobs=(_job(max_gco2=1000.0),),
    )
    [a] = solve(market).assignments
    assert a.offer == "clean"  # dearer, but the only one under the cap
    capped = replace(market, jobs=(_job(max_gco2=10.0),))
    assert solve(capped).unassigned == ("j",)


def test_a_carbon_price_moves_work_to_clean_grids() -> None:
    market = Market(
        offers=(_offer("dirty", grid=800.0, price=2.0), _offer("clean", grid=20.0, price=2.2)),
        jobs=(_job(),),
    )
    assert solve(market).assignments[0].offer == "dirty"  # cheaper, at no carbon price
    # 4.62 kWh x 780 g more = 3.6 kg; 0.2 $/h x 2 x 3 h = $1.20 more: worth it above 333 $/t.
    assert (
        solve(replace(market, weights=Weights(carbon_usd_per_t=300.0))).assignments[0].offer
        == "dirty"
    )
    assert (
        solve(replace(market, weights=Weights(carbon_usd_per_t=400.0))).assignments[0].offer
        == "clean"
    )


def _emissions(result: Result) -> float:
    return sum(a.gco2 for a in result.assignments)


@SLOW
@given(markets(max_jobs=6, max_offers=3))
def test_a_higher_carbon_price_never_raises_emissions(market: Market) -> None:
    """Exact optima at two carbon prices: the dearer carbon never emits more."""
    jobs = tuple(replace(j, carbon_usd_per_t=None) for j in market.jobs)
    low, high = (
        solve(replace(market, jobs=jobs, weights=replace(market.weights, carbon_usd_per_t=p)))
        for p in (0.0, 500.0)
    )
    assert low.status == high.status == "OPTIMAL"
    for result, price in ((low, 0.0), (high, 500.0)):
        w = replace(market.weights, carbon_usd_per_t=price)
        m = replace(market, jobs=jobs, weights=w)
        chosen = {a.job: a.offer for a in result.assignments}
        assert math.isclose(result.objective, reference.brute_force(m), rel_tol=1e-9, abs_tol=1e-6)
        reference.check_answer(m, chosen)
    assert _emissions(high) <= _emissions(low) + 1e-6 * max(1.0, _emissions(low))
