from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings

from solver import Job, Market, Offer, Weights, placeable, solve
from solver.market import Result
from tests.solver import reference
from tests.solver.strategies import markets

SLOW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pairs(result: Result) -> dict[str, str]:
    return {a.job: a.offer for a in result.assignments}


@SLOW
@given(markets())
def test_every_answer_obeys_the_rules_and_its_objective_adds_up(market: Market) -> None:
    result = solve(market, time_limit=5)
    chosen = pairs(result)
    assert len(chosen) == len(result.assignments), "a job assigned twice"
    reference.check_answer(market, chosen)
    assert set(chosen) | set(result.unassigned) == {j.id for j in market.jobs}
    assert not set(chosen) & set(result.unassigned)
    assert math.isclose(result.objective, reference.objective(market, chosen), abs_tol=1e-6)
    for a in result.assignments:
        job = next(j for j in market.jobs if j.id == a.job)
        offer = next(o for o in market.offers if o.id == a.offer)
        assert math.isclose(a.cost, reference.cost(job, offer, market.weights), rel_tol=1e-9)
    if result.bound is not None:
        assert result.objective <= result.bound + 1e-6 * max(1.0, abs(result.bound))


@SLOW
@given(markets(max_jobs=6, max_offers=3))
def test_small_markets_reach_the_exact_optimum(market: Market) -> None:
    result = solve(market, time_limit=5)
    optimum = reference.brute_force(market)
    assert math.isclose(result.objective, optimum, rel_tol=1e-9, abs_tol=1e-6)
    assert result.status == "OPTIMAL"
    assert result.bound is not None
    assert math.isclose(result.bound, optimum, rel_tol=1e-6, abs_tol=1e-4)


@SLOW
@given(markets())
def test_placeable_jobs_are_those_some_offer_may_take(market: Market) -> None:
    """``placeable`` and a solve's ``unplaceable`` agree with the rules, job by job:
    the clearing process leaves the unplaceable out of later rounds."""
    w, offers = market.weights, market.offers
    expected = {j.id for j in market.jobs if any(reference.feasible(j, o, w) for o in offers)}
    assert placeable(market) == expected
    result = solve(market, time_limit=5)
    assert set(result.unplaceable) == {j.id for j in market.jobs} - expected
    assert set(result.unplaceable) <= set(result.unassigned)


def _offer(oid: str, count: int, price: float, **kw: object) -> Offer:
    base: dict[str, object] = dict(
        id=oid,
        vendor="nvidia",
        accelerator="h100-sxm",
        platform="cuda",
        count=count,
        memory_gib=80,
        tflops_bf16=989,
        tflops_fp32=67,
        mem_bw_gbps=3350,
        price_per_hour=price,
        region="eu",
        country="NL",
        lat=52.4,
        lon=4.9,
    )
    base.update(kw)
    return Offer(**base)  # type: ignore[arg-type]


def test_priority_first_then_cost() -> None:
    market = Market(
        offers=(_offer("cheap", 1, 1.0), _offer("dear", 1, 3.0)),
        jobs=(
            Job("low", ("cuda",), 5.0, duration_hours=1),
            Job("high", ("cuda",), 5.0, duration_hours=1, priority=3),
            Job("mid", ("cuda",), 5.0, duration_hours=1, priority=2),
        ),
    )
    result = solve(market)
    assert set(pairs(result)) == {"high", "mid"}
    assert result.unassigned == ("low",)
    # Both matched jobs pay some offer; the total is as cheap as it can be.
    assert math.isclose(sum(a.cost for a in result.assignments), 4.0)
    assert result.status == "OPTIMAL"


def test_a_match_costing_more_than_its_value_is_never_made() -> None:
    market = Market(
        offers=(_offer("o", 1, 2.0),),
        jobs=(Job("long", ("cuda",), 5.0, duration_hours=100),),
        weights=Weights(placement_value_usd=150),
    )
    assert solve(market).assignments == ()


def test_a_programs_runtime_counts_start_up_and_moving_its_data() -> None:
    # 1e15 flops on one H100 at 40 % of 989 TFLOPS: 2.53 s of work; 10 s of start-up;
    # 3 GB in and out at 4 s per GB: 12 s; 6 KB of program at 0.5 s per KB: 3 s. The
    # slower mover is the dearer match.
    work = 1e15 / (989e12 * 0.4)
    market = Market(
        offers=(
            _offer(
                "fast", 1, 2.0, startup_seconds=10.0, transfer_s_per_gb=4.0, compile_s_per_kb=0.5
            ),
            _offer("slow", 1, 2.0, startup_seconds=10.0, transfer_s_per_gb=400.0),
        ),
        jobs=(Job("j", ("cuda",), 5.0, flops=1e15, io_gb=3.0, program_kb=6.0),),
    )
    (a,) = solve(market).assignments
    assert a.offer == "fast"
    assert math.isclose(a.startup_seconds, 25.0)  # 10 s + 12 s of data + 3 s compiling
    assert math.isclose(a.runtime_hours * 3600, work + 25.0)
    # A job that states its duration pays none of it.
    market = Market(
        offers=market.offers, jobs=(Job("d", ("cuda",), 5.0, duration_hours=1, io_gb=3.0),)
    )
    (a,) = solve(market).assignments
    assert a.startup_seconds == 0.0
    assert a.runtime_hours == 1.0


def test_empty_markets() -> None:
    assert solve(Market(offers=(), jobs=())).status == "OPTIMAL"
    lonely = solve(Market(offers=(), jobs=(Job("j", ("cuda",), 1.0, duration_hours=1),)))
    assert lonely.unassigned == ("j",)
    assert lonely.objective == 0


@pytest.mark.parametrize("seed", range(3))
def test_answers_are_deterministic(seed: int) -> None:
    from hypothesis import find

    market = find(markets(max_jobs=7, max_offers=4), lambda m: len(m.jobs) >= 5 + seed % 2)
    first, second = solve(market), solve(market)
    assert pairs(first) == pairs(second)
    assert first.objective == second.objective


def test_a_realistic_market_is_solved_the_same_way_twice() -> None:
    from benchmarks.markets import build_market
    from solver import first_come_first_served

    market = build_market(400, 100, seed=3)
    first, second = solve(market, time_limit=30), solve(market, time_limit=30)
    assert pairs(first) == pairs(second)
    assert first.bound is not None
    assert first.objective >= (1 - 0.005) * first.bound
    assert first.objective >= first_come_first_served(market).objective
    reference.check_answer(market, pairs(first))


def test_big_jobs_get_the_true_lp_bound_and_a_good_answer() -> None:
    """A knapsack-like round (every job needs 2-5 accelerators)."""
    import random
    import time

    import numpy as np
    import scipy.sparse as sp
    from scipy.optimize import linprog

    from solver import first_come_first_served
    from solver.pairs import scan
    from solver.rules import MarketArrays

    rng = random.Random(5)
    offers = tuple(
        _offer(f"o{i}", rng.randint(4, 12), round(rng.uniform(1, 4), 2)) for i in range(10)
    )
    jobs = tuple(
        Job(
            f"j{i}",
            ("cuda",),
            round(rng.uniform(1.5, 5), 2),
            accelerators=rng.randint(2, 5),
            duration_hours=rng.uniform(0.5, 10),
            priority=rng.choice([1, 1, 2]),
        )
        for i in range(60)
    )
    market = Market(offers=offers, jobs=jobs)
    started = time.perf_counter()
    result = solve(market, time_limit=10)
    assert time.perf_counter() - started < 12

    a = MarketArrays.build(market)
    feasible, _ = scan(a, 1)
    n, job, offer = feasible.size, feasible.job.astype(int), feasible.offer.astype(int)
    rows = sp.csr_matrix(
        (
            np.concatenate([np.ones(n), a.j_accelerators[job]]),
            (np.concatenate([job, a.n_jobs + offer]), np.concatenate([np.arange(n)] * 2)),
        ),
        shape=(a.n_jobs + a.n_offers, n),
    )
    lp = linprog(
        -feasible.weight,
        A_ub=rows,
        b_ub=np.concatenate([np.ones(a.n_jobs), a.o_count]),
        bounds=(0, 1),
        method="highs",
    )
    assert result.bound is not None
    assert result.bound <= -lp.fun * (1 + 1e-6)
    assert result.objective >= first_come_first_served(market).objective
    assert result.objective >= 0.85 * result.bound
    reference.check_answer(market, pairs(result))


def test_a_round_out_of_time_returns_its_best_feasible_answer() -> None:
    """A time limit far too short for this market: the answer is still valid, no worse
    than first-come-first-served, and says it may not be optimal."""
    from benchmarks.markets import build_market
    from solver import first_come_first_served

    market = build_market(3000, 400, seed=11)
    result = solve(market, time_limit=0.01)
    assert result.status in ("FEASIBLE", "OPTIMAL")
    assert result.assignments
    reference.check_answer(market, pairs(result))
    assert result.objective >= first_come_first_served(market).objective
    if result.bound is not None:
        assert result.objective <= result.bound + 1e-6 * abs(result.bound)
