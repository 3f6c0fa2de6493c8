"""Clear a market: choose at most one offer per job, maximising the round's value.

The pipeline uses the problem's structure rather than one big integer model:

1. ``rules``: every market rule, vectorised over jobs x offers in blocks.
2. ``candidates``: keep each job's most valuable feasible pairs.
3. ``lp``: solve the LP relaxation (GLOP); price every feasible pair against
   its duals, add the pairs that could improve it, and repeat. The duals give
   a proven upper bound on the round (``bound``), pruning included.
4. ``integer``: one-accelerator jobs are a transportation problem, solved
   exactly by min-cost flow; multi-accelerator jobs are rounded from the LP
   first. First-come-first-served is computed too, and the better answer wins,
   so a round is never worse than the peer baseline.

Everything is deterministic for a given input.
"""

from __future__ import annotations

import time

import numpy as np

from solver import exact, integer
from solver.candidates import build, price_out
from solver.lp import solve_lp
from solver.market import Assignment, Market, Result
from solver.rules import MarketArrays, evaluate_pairs

DEFAULT_CANDIDATES = 24
PRICING_ROUNDS = 4


def solve(market: Market, time_limit: float = 10.0, candidates: int | None = None) -> Result:
    """Clear ``market`` within about ``time_limit`` seconds."""
    started = time.perf_counter()
    deadline = started + time_limit
    a = MarketArrays.build(market)
    if a.n_jobs == 0 or a.n_offers == 0:
        return _result(a, np.full(a.n_jobs, -1), 0.0, started, {})

    k = candidates or DEFAULT_CANDIDATES
    cands = build(a, k)
    stats: dict[str, float] = {"candidates_initial": float(cands.size)}

    lp = None
    bound: float | None = None
    for _ in range(PRICING_ROUNDS):
        remaining = deadline - time.perf_counter()
        if remaining <= 0.5:
            break
        lp = solve_lp(a, cands, remaining * 0.6)
        if lp is None:
            break
        job_value, jobs, offers, weights = price_out(a, lp.offer_price, k)
        bound = float(job_value.sum() + (a.o_count * lp.offer_price).sum())
        reduced = weights - a.j_accelerators[jobs] * lp.offer_price[offers]
        improving = reduced > lp.job_price[jobs] + 1e-6 * np.maximum(1.0, np.abs(weights))
        if not improving.any():
            break
        cands.extend(jobs[improving], offers[improving], weights[improving])
    stats["candidates"] = float(cands.size)
    stats["lp_objective"] = lp.objective if lp else float("nan")

    answers = [integer.round_lp(a, cands, lp.x if lp else None), integer.first_come(a, cands)]
    values = [integer.objective(a, cands, integer.pairs_of(cands, s)) for s in answers]
    stats["baseline_on_candidates"] = values[1]
    best = answers[int(np.argmax(values))]

    # Several-accelerator jobs make rounding inexact: let CP-SAT improve it.
    if (a.j_accelerators[cands.job] > 1).any():
        remaining = deadline - time.perf_counter()
        answer = exact.improve(a, cands, best, deterministic_seconds=remaining * 0.5)
        if answer is not None:
            value = integer.objective(a, cands, integer.pairs_of(cands, answer.assigned))
            if value > max(values):
                best = answer.assigned
            # Without pruning the candidates are every feasible pair, so
            # CP-SAT's bound holds for the whole round.
            if bool((cands.feasible_per_job <= k).all()):
                bound = answer.bound if bound is None else min(bound, answer.bound)
    return _result(a, best, bound, started, stats)


def _result(
    a: MarketArrays,
    assigned: np.ndarray,
    bound: float | None,
    started: float,
    stats: dict[str, float],
) -> Result:
    jobs = np.nonzero(assigned >= 0)[0]
    offers = assigned[jobs]
    block = evaluate_pairs(a, jobs, offers)
    cost = block.cost
    objective = float((a.j_value[jobs] - cost).sum())
    assignments = tuple(
        Assignment(
            job=a.jobs[j].id,
            offer=a.offers[o].id,
            cost=float(cost[i]),
            runtime_hours=float(block.runtime[i]),
            compute_usd=float(block.compute[i]),
            egress_usd=float(block.egress[i]),
            latency_usd=float(block.latency[i]),
            rtt_ms=float(block.rtt[i]),
        )
        for i, (j, o) in enumerate(zip(jobs.tolist(), offers.tolist(), strict=True))
    )
    unassigned = tuple(a.jobs[j].id for j in np.nonzero(assigned < 0)[0].tolist())
    optimal = bound is not None and objective >= bound - 1e-6 * max(1.0, abs(bound))
    if a.n_jobs == 0 or a.n_offers == 0:
        bound, optimal = 0.0, True
    return Result(
        status="OPTIMAL" if optimal else "FEASIBLE",
        objective=objective,
        bound=bound,
        solve_seconds=time.perf_counter() - started,
        assignments=assignments,
        unassigned=unassigned,
        stats=stats,
    )
