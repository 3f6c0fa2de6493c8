"""Clear a market: choose at most one offer per job, maximising the round's value.

The pipeline uses the problem's structure rather than one big integer model:

1. ``rules`` applies every market rule, vectorised over blocks of jobs x offers;
   ``pairs.scan`` keeps the feasible pairs, and each job's most valuable ones
   as the first candidates.
2. ``integer.assign`` places one-accelerator jobs exactly by min-cost flow
   (a transportation problem) and larger jobs around them.
3. ``prices.prove`` turns the assignment into offer prices (the LP dual), which
   bound the round over *all* feasible pairs; pairs the prices say could do
   better join the candidates, and 2-3 repeat until none are left or time is up.
4. Jobs needing several accelerators make the round a knapsack problem: on
   rounds small enough the LP over every pair (GLOP) gives the true bound and
   guides their rounding, and CP-SAT, hinted with the best assignment, improves
   the answer.
5. First-come-first-served (the peer baseline) is computed on the same pairs and
   kept if it is better, so a round never does worse than it.

Answers are deterministic for a given input: there is no randomness, rounds of
step 3 stop when no pair is left to add or the answer is within ``GAP_GOAL`` of
the bound, and CP-SAT is bounded by deterministic time. The time limit is a
safety net; only a machine too slow to reach those stops within it can give a
different (earlier) answer.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from solver import exact, integer, prices
from solver.lp import solve_lp
from solver.market import Assignment, Market, Result
from solver.pairs import Candidates, FeasiblePairs, scan
from solver.rules import Ints, MarketArrays, evaluate, evaluate_pairs

FIRST_CANDIDATES = 32  # per job, from the scan
ADDED_PER_ROUND = 32  # per job, from pricing
KEPT_PER_ROUND = 16  # per job, of the pairs already in the working set
# CP-SAT's deterministic seconds per round; about ten wall seconds each on a
# 2-core machine, so it polishes small rounds and leaves large ones alone.
CP_SAT_BUDGET = 0.1
MAX_ROUNDS = 50
GAP_GOAL = 0.005  # rounds stop within 0.5 % of the bound, well inside the targets


def solve(market: Market, time_limit: float = 10.0) -> Result:
    """Clear ``market`` in about ``time_limit`` seconds at most."""
    started = time.perf_counter()
    deadline = started + time_limit
    a = MarketArrays.build(market)
    if a.n_jobs == 0 or a.n_offers == 0:
        nothing = _result(a, np.full(a.n_jobs, -1, dtype=np.int64), 0.0, started, {})
        return replace(nothing, unplaceable=nothing.unassigned)

    pairs, cands = scan(a, FIRST_CANDIDATES)
    unplaceable = tuple(a.jobs[j].id for j in np.flatnonzero(np.diff(pairs.start) == 0).tolist())
    stats: dict[str, float] = {"feasible_pairs": float(pairs.size), "scanned_at": _since(started)}
    has_big_jobs = bool((a.j_accelerators > 1).any())
    assigned = integer.assign(a, cands)
    bound: float | None = None
    rounds = 0
    round_started = time.perf_counter()
    while rounds < MAX_ROUNDS:
        rounds += 1
        last_round = time.perf_counter() - round_started
        round_started = time.perf_counter()
        price = prices.prove(a, cands, assigned)
        round_bound, reduced = prices.bound(a, pairs, price)
        bound = round_bound if bound is None else min(bound, round_bound)
        jobs, offers, weights = prices.improving(
            a, pairs, reduced, cands, assigned, price, ADDED_PER_ROUND
        )
        # Stop while there is time for another round and the last steps (a final
        # assignment with both orders, and the baseline) after it.
        if time.perf_counter() + 3 * last_round + _reserve(a) > deadline:
            break
        if bound - integer.objective(cands, assigned) <= GAP_GOAL * bound:
            break  # close enough to the bound: more rounds would not pay
        # The working set follows the prices: each job keeps the pairs that are
        # best at current prices (and its own), plus the newly improving ones.
        # Pairs of big jobs stay: the flow's prices do not speak for them.
        here = assigned[cands.job] == cands.offer
        big = a.j_accelerators[cands.job] > 1
        net = cands.weight - a.j_accelerators[cands.job] * price[cands.offer]
        cands.keep_best(net, KEPT_PER_ROUND, here | big)
        if cands.add(jobs, offers, weights) == 0:
            break  # the prices point only at pairs the optimiser already has
        assigned = integer.assign(a, cands, both_orders=False)
    assert bound is not None
    stats.update(rounds=float(rounds), rounds_done_at=_since(started))

    # Big jobs make the round a knapsack problem, which the flow's prices do not
    # bound well: on rounds small enough, the LP over every pair gives the true
    # bound and says which big jobs are worth placing where.
    lp_x = None
    if has_big_jobs:
        remaining = deadline - time.perf_counter() - _reserve(a)
        solution = solve_lp(a, pairs, time_limit=remaining / 3)
        if solution is not None:
            bound = min(bound, prices.bound(a, pairs, solution.offer_price)[0])
            chosen = solution.x > 1e-6
            cands.add(
                pairs.job[chosen].astype(np.int64),
                pairs.offer[chosen].astype(np.int64),
                pairs.weight[chosen],
            )
            lp_x = _on_candidates(a, pairs, solution.x, cands)
    # The last word: both orders for big jobs (and the LP's), on the final set.
    final = integer.assign(a, cands, lp_x=lp_x)
    value, final_value = integer.objective(cands, assigned), integer.objective(cands, final)
    if final_value > value:
        assigned, value = final, final_value
    stats["candidates"] = float(cands.size)

    if has_big_jobs and bound - value > 1e-9 * max(1.0, abs(bound)):
        share = float((a.j_accelerators > 1).mean())
        answer = exact.improve(
            a,
            cands,
            assigned,
            deterministic_seconds=CP_SAT_BUDGET * (1 + 4 * share),
            wall_seconds=deadline - time.perf_counter() - _reserve(a),
        )
        if answer is not None:
            better = integer.objective(cands, answer.assigned)
            if better > value:
                assigned, value = answer.assigned, better
            if answer.optimal and cands.size == pairs.size:
                # The candidates are every feasible pair: CP-SAT's bound is the
                # round's, up to the rounding of its integer weights.
                slack = exact.ROUNDING_USD * a.n_jobs
                bound = min(bound, max(answer.bound + slack, value))

    stats["improved_at"] = _since(started)
    baseline = integer.first_come(a, pairs)
    baseline_value = float(sum(_weights(a, pairs, baseline)))
    stats["baseline_objective"] = baseline_value
    if baseline_value > value:
        assigned = baseline
    return replace(_result(a, assigned, bound, started, stats), unplaceable=unplaceable)


def placeable(market: Market) -> frozenset[str]:
    """The jobs that at least one offer of ``market`` may take, every rule applied
    (the capacity left, the bid, the budget and the weights' fee included)."""
    a = MarketArrays.build(market)
    if a.n_jobs == 0 or a.n_offers == 0:
        return frozenset()
    found = np.zeros(a.n_jobs, dtype=bool)
    for block in a.blocks():
        found[block] = evaluate(a, block).feasible.any(axis=1)
    return frozenset(a.jobs[j].id for j in np.flatnonzero(found).tolist())


def first_come_first_served(market: Market) -> Result:
    """The peer baseline: each job in order takes its cheapest feasible offer left."""
    started = time.perf_counter()
    a = MarketArrays.build(market)
    pairs, _ = scan(a, 1)
    return _result(a, integer.first_come(a, pairs), None, started, {})


def _on_candidates(
    a: MarketArrays, pairs: FeasiblePairs, x: np.ndarray, c: Candidates
) -> np.ndarray:
    """Values given per feasible pair, looked up for each candidate pair."""
    keys = pairs.job.astype(np.int64) * a.n_offers + pairs.offer  # sorted, by the scan
    at = np.searchsorted(keys, c.job * a.n_offers + c.offer)
    return np.asarray(x[at])


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def _reserve(a: MarketArrays) -> float:
    """Seconds kept back for the baseline and the result."""
    return 0.2 + a.n_jobs * 5e-5


def _weights(a: MarketArrays, pairs: FeasiblePairs, assigned: Ints) -> list[float]:
    out = []
    for j in np.flatnonzero(assigned >= 0).tolist():
        row = pairs.row(j)
        out.append(float(pairs.weight[row][pairs.offer[row] == assigned[j]][0]))
    return out


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
