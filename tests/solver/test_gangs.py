"""Rounds where many jobs are gangs (several accelerators on one offer).

Such a round is a multiple-knapsack problem. The solver's bound must be a true
upper bound (checked against the LP and the integer optimum computed here
with HiGHS, test-only), its answers feasible, and its proven gap small.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from solver import Market, first_come_first_served, solve
from solver.clearing import GAP_GOAL
from solver.market import Result
from solver.pairs import FeasiblePairs, scan
from solver.rules import MarketArrays
from tests.solver import reference
from tests.solver.strategies import gang_markets

SLOW = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pairs(result: Result) -> dict[str, str]:
    return {a.job: a.offer for a in result.assignments}


def _rows(market: Market) -> tuple[FeasiblePairs, sp.csr_matrix, np.ndarray]:
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
    return feasible, rows, np.concatenate([np.ones(a.n_jobs), a.o_count])


def lp_bound(market: Market) -> float:
    """The LP relaxation's optimum over every feasible pair, by HiGHS."""
    feasible, rows, rhs = _rows(market)
    if feasible.size == 0:
        return 0.0
    lp = linprog(-feasible.weight, A_ub=rows, b_ub=rhs, bounds=(0, 1), method="highs")
    assert lp.status == 0
    return float(-lp.fun)


def integer_optimum(market: Market) -> float:
    """The exact optimum, by HiGHS's branch and bound."""
    feasible, rows, rhs = _rows(market)
    if feasible.size == 0:
        return 0.0
    answer = milp(
        -feasible.weight,
        constraints=LinearConstraint(rows, -np.inf, rhs),
        integrality=np.ones(feasible.size),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 1e-9},
    )
    assert answer.status == 0
    return float(-answer.fun)


def check(market: Market, result: Result) -> None:
    chosen = pairs(result)
    assert len(chosen) == len(result.assignments), "a job assigned twice"
    reference.check_answer(market, chosen)  # feasible, no offer oversold
    assert math.isclose(result.objective, reference.objective(market, chosen), abs_tol=1e-6)
    assert result.bound is not None
    assert result.objective <= result.bound + 1e-6 * max(1.0, abs(result.bound))
    assert result.objective >= first_come_first_served(market).objective - 1e-6


@SLOW
@given(gang_markets(max_jobs=12, max_offers=5))
def test_gang_answers_are_feasible_and_bounded_by_a_true_bound(market: Market) -> None:
    result = solve(market, time_limit=5)
    check(market, result)
    assert result.bound is not None
    optimum = integer_optimum(market)
    assert result.bound >= optimum - 1e-6 * max(1.0, abs(optimum))
    assert result.objective >= (1 - GAP_GOAL) * optimum - 1e-6


@SLOW
@given(gang_markets(max_jobs=6, max_offers=3))
def test_small_gang_markets_reach_the_exact_optimum(market: Market) -> None:
    result = solve(market, time_limit=5)
    check(market, result)
    optimum = reference.brute_force(market)
    assert math.isclose(result.objective, optimum, rel_tol=1e-9, abs_tol=1e-6)


@pytest.mark.parametrize(("size", "share"), [((1000, 200), 0.3), ((1500, 300), 0.15)])
def test_the_bound_is_the_lp_bound(size: tuple[int, int], share: float) -> None:
    """Medium markets of the benchmark's family (too large for CP-SAT over every
    pair, which may prove a lower bound): the bound is the LP's optimum, within
    the precision at which the solver stops pricing."""
    from benchmarks.markets import build_market

    market = build_market(*size, seed=4, multi_share=share)
    result = solve(market, time_limit=30)
    check(market, result)
    assert result.stats["feasible_pairs"] > 20_000
    lp = lp_bound(market)
    assert result.bound is not None
    assert result.bound >= lp * (1 - 1e-9)
    assert result.bound <= lp * (1 + 2e-4)
    assert result.gap is not None
    assert result.gap <= 0.01


def test_a_hard_market_stays_within_its_gap_goal() -> None:
    """The benchmark's 2,000 x 500 market with 30 % gangs: the gap the solver
    proves (never wall time) is inside the goal of 1 %."""
    from benchmarks.markets import build_market

    market = build_market(2000, 500, seed=0, multi_share=0.30)
    result = solve(market, time_limit=60)
    check(market, result)
    assert result.gap is not None
    assert result.gap <= 0.01


def test_a_warm_round_starts_from_the_last_one() -> None:
    """The LP's working set and prices carry over: a round over the same book
    needs no more LP iterations than a cold one, and a book that changed (jobs
    gone, offers gone) is still answered correctly from a stale hand-over."""
    from dataclasses import replace

    from benchmarks.markets import build_market

    market = build_market(600, 150, seed=2, multi_share=0.3)
    cold = solve(market, time_limit=30)
    assert cold.warm is not None
    warm = solve(market, time_limit=30, warm=cold.warm)
    assert warm.stats["lp_iterations"] <= cold.stats["lp_iterations"]
    assert warm.gap is not None
    assert warm.gap <= 0.01
    check(market, warm)

    changed = replace(market, jobs=market.jobs[50:], offers=market.offers[10:])
    stale = solve(changed, time_limit=30, warm=cold.warm)
    check(changed, stale)
    assert stale.bound is not None
    assert stale.bound >= lp_bound(changed) * (1 - 1e-9)
