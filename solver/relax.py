"""The LP relaxation of a round with gangs, solved exactly as a transportation problem.

    max  sum_p w_p x_p
    s.t. sum_{p of job j}   x_p      <= 1         (a job runs at most once)
         sum_{p on offer o} a_j x_p  <= count_o   (no offer is oversold)
         0 <= x_p <= 1

Write ``y_p = a_j x_p``, the accelerators pair ``p`` takes. Then the LP is

    max  sum_p (w_p / a_j) y_p
    s.t. sum_{p of job j} y_p <= a_j,   sum_{p on offer o} y_p <= count_o,   y >= 0

(``y_p <= a_j`` follows from the job's row): a transportation problem in
which job ``j`` supplies ``a_j`` units, each worth ``w_p / a_j`` where it goes.
Min-cost flow solves it exactly and fast, and its optimum is integral in
``y``: one-accelerator jobs are placed whole, and a gang is either on one
offer or split over a few (the LP's fractional part).

Over a working set of pairs the flow gives offer prices ``pi`` (by
complementary slackness, ``prices.prove_units``); those price every feasible
pair in one pass, and pairs worth more than their job's surplus join the set.
When none is left the flow's value is the LP bound over every pair; before
that, weak duality still makes ``prices.bound(pi)`` a true upper bound.

The working set and prices carry over between clearing rounds (``Warm``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from ortools.graph.python import min_cost_flow

from solver import integer, prices
from solver.pairs import Candidates, FeasiblePairs, best_per_job
from solver.rules import Floats, Ints, MarketArrays

FIRST_PER_JOB = 4  # pairs per job in a cold working set, most valuable at the start prices
SPREAD_PER_JOB = 32  # more pairs per job, spread over its offers
ADDED_PER_JOB = 16  # pairs per job added by one pricing pass
SCALE = 1e6  # integer cost units per USD of one accelerator's share of a pair
CLOSE_ENOUGH = 1e-4  # relative distance of the flow's value to the bound that stops pricing


@dataclass(frozen=True)
class Warm:
    """What a round hands the next: its working pairs and its offer prices, by id."""

    pairs: frozenset[tuple[str, str]]  # (job id, offer id)
    offer_price: dict[str, float]


@dataclass(frozen=True)
class Relaxation:
    working: Ints  # indices of the working set's pairs in ``FeasiblePairs``
    x: Floats  # LP value of each working pair (the share of its job placed there)
    offer_price: Floats  # per offer, per accelerator
    bound: float  # a true upper bound on the round
    lp_value: float  # the working set's LP optimum
    complete: bool  # pricing found nothing to add: lp_value is the LP bound
    iterations: int


def relax(
    a: MarketArrays,
    pairs: FeasiblePairs,
    deadline: float,
    warm: Warm | None = None,
    price: Floats | None = None,
) -> Relaxation | None:
    """Solve the LP by pricing rounds until nothing is left to add, or ``deadline``.

    The first working set is each job's best pairs at ``price`` (or ``warm``'s
    prices) and a few spread over its offers, with ``warm``'s pairs. None when
    there are no pairs.
    """
    if pairs.size == 0:
        return None
    start_price = _warm_prices(a, warm) if price is None else price
    in_set = np.zeros(pairs.size, dtype=bool)
    in_set[_first_working_set(a, pairs, start_price, warm)] = True
    need = a.j_accelerators[pairs.job].astype(np.float64)
    bound = np.inf
    iterations = 0
    while True:
        iterations += 1
        working = np.flatnonzero(in_set)
        y = transport(a, pairs, working)
        x = y / a.j_accelerators[pairs.job[working]]
        lp_value = float(pairs.weight[working] @ x)
        offer_price = prices.prove_units(a, pairs, working, y)
        round_bound, reduced = prices.bound(a, pairs, offer_price, need)
        bound = min(bound, round_bound)
        surplus = _surplus(a, pairs, working, y, offer_price)
        reduced -= surplus[pairs.job]
        entering = _entering(pairs, reduced, in_set, ADDED_PER_JOB)
        result = Relaxation(
            working=working,
            x=x,
            offer_price=offer_price,
            bound=max(bound, lp_value),
            lp_value=lp_value,
            complete=len(entering) == 0,
            iterations=iterations,
        )
        if result.complete or time.perf_counter() >= deadline:
            return result
        if result.bound - lp_value <= CLOSE_ENOUGH * abs(result.bound):
            return result  # the last pairs would move the bound by less than this
        in_set[entering] = True


def transport(a: MarketArrays, pairs: FeasiblePairs, working: Ints) -> Floats:
    """Accelerators per working pair in the optimal flow (exact, integral)."""
    job = pairs.job[working].astype(np.int64)
    offer = pairs.offer[working].astype(np.int64)
    jobs, job_node = np.unique(job, return_inverse=True)
    offers, offer_node = np.unique(offer, return_inverse=True)
    n_jobs, n_offers = len(jobs), len(offers)
    source, sink = 0, n_jobs + n_offers + 1
    supply = a.j_accelerators[jobs]
    total = int(supply.sum())
    unit_value = pairs.weight[working] / a.j_accelerators[job]
    tails = np.concatenate([np.zeros(n_jobs), 1 + job_node, 1 + n_jobs + np.arange(n_offers), [0]])
    heads = np.concatenate(
        [1 + np.arange(n_jobs), 1 + n_jobs + offer_node, np.full(n_offers, sink), [sink]]
    )
    capacities = np.concatenate([supply, a.j_accelerators[job], a.o_count[offers], [total]]).astype(
        np.int64
    )
    # Finest integer costs first; markets whose values overflow them at that
    # scale (a huge placement value) are solved at a coarser one.
    for scale in (SCALE, SCALE / 1e3, 1.0):
        costs = np.concatenate(
            [np.zeros(n_jobs), -np.round(unit_value * scale), np.zeros(n_offers), [0]]
        ).astype(np.int64)
        flow = min_cost_flow.SimpleMinCostFlow()
        flow.add_arcs_with_capacity_and_unit_cost(
            tails.astype(np.int32), heads.astype(np.int32), capacities, costs
        )
        flow.set_nodes_supplies(
            np.array([source, sink], dtype=np.int32), np.array([total, -total], dtype=np.int64)
        )
        if flow.solve() == flow.OPTIMAL:
            break
    else:
        raise RuntimeError("min-cost flow failed on the LP relaxation at every cost scale")
    arcs = np.arange(n_jobs, n_jobs + len(working))
    flows: Floats = flow.flows(arcs).astype(np.float64)
    return flows


def warm_from(a: MarketArrays, pairs: FeasiblePairs, r: Relaxation) -> Warm:
    """The hand-over for the next round: the pairs the LP used, and the prices."""
    used = r.working[r.x > 1e-9]
    return Warm(
        pairs=frozenset(
            (a.jobs[j].id, a.offers[o].id)
            for j, o in zip(pairs.job[used].tolist(), pairs.offer[used].tolist(), strict=True)
        ),
        offer_price={
            a.offers[o].id: float(p) for o, p in enumerate(r.offer_price.tolist()) if p > 0
        },
    )


def pair_indices(a: MarketArrays, pairs: FeasiblePairs, keys: Ints) -> Ints:
    """Indices in ``pairs`` of the pairs ``job * n_offers + offer`` that are feasible."""
    known = pairs.job.astype(np.int64) * a.n_offers + pairs.offer  # sorted, by the scan
    at = np.searchsorted(known, keys)
    inside = at < len(known)
    at, keys = at[inside], keys[inside]
    return np.asarray(at[known[at] == keys], dtype=np.int64)


def _surplus(
    a: MarketArrays, pairs: FeasiblePairs, working: Ints, y: Floats, price: Floats
) -> Floats:
    """Each job's dual ``u_j``: what its place is worth to it at ``price`` (0 if unplaced
    or only partly placed: then any pair worth more than nothing could take it)."""
    surplus = np.zeros(a.n_jobs)
    job = pairs.job[working]
    placed = np.zeros(a.n_jobs)
    np.add.at(placed, job, y)
    used = y > 0
    whole = placed[job] >= a.j_accelerators[job]
    net = pairs.weight[working] - a.j_accelerators[job] * price[pairs.offer[working]]
    on = used & whole
    np.maximum.at(surplus, job[on], np.maximum(net[on], 0.0))
    return surplus


def _entering(pairs: FeasiblePairs, gain: Floats, in_set: np.ndarray, per_job: int) -> Ints:
    """Up to ``per_job`` pairs of each job with the highest positive ``gain`` that
    are not in the working set ``in_set``."""
    positive = np.flatnonzero((gain > prices.TOLERANCE_USD) & ~in_set)
    if len(positive) == 0:
        return positive.astype(np.int64)
    best = best_per_job(pairs.job[positive].astype(np.int64), gain[positive], per_job)
    chosen: Ints = positive[best].astype(np.int64)
    return chosen


def top_per_job(pairs: FeasiblePairs, value: Floats, k: int) -> Ints:
    """Each job's ``k`` pairs of highest ``value``: ``k`` passes of a per-job max,
    cheaper than sorting millions of pairs for small ``k``."""
    value = value.astype(np.float64, copy=True)
    nonempty = np.flatnonzero(np.diff(pairs.start) > 0)
    starts = pairs.start[nonempty]
    level = np.full(len(pairs.start) - 1, np.inf)
    found: list[Ints] = []
    for _ in range(k):
        best = np.maximum.reduceat(value, starts)
        live = best > -np.inf
        if not live.any():
            break
        level[nonempty] = np.where(live, best, np.inf)
        hit = np.flatnonzero(value >= level[pairs.job])
        hit = hit[np.concatenate([[True], pairs.job[hit][1:] != pairs.job[hit][:-1]])]
        found.append(hit)
        value[hit] = -np.inf
    return np.sort(np.concatenate(found)).astype(np.int64) if found else np.zeros(0, np.int64)


def round_down(a: MarketArrays, pairs: FeasiblePairs, r: Relaxation) -> Ints:
    """An integer answer from the LP's: what it places whole stays; gangs it splits
    go whole where room is left, most valuable first; the room still left goes
    to unplaced jobs by min-cost flow (one accelerator) and greedily (gangs)."""
    assigned = np.full(a.n_jobs, -1, dtype=np.int64)
    residual = a.o_count.copy()
    job = pairs.job[r.working].astype(np.int64)
    offer = pairs.offer[r.working].astype(np.int64)
    weight = pairs.weight[r.working]
    whole = r.x >= 1.0 - 1e-9
    assigned[job[whole]] = offer[whole]
    np.subtract.at(residual, offer[whole], a.j_accelerators[job[whole]])
    c = Candidates(job, offer, weight)
    split = np.flatnonzero((r.x > 1e-9) & ~whole)
    # Each split gang tries its pairs by the LP's share, its most valuable first.
    order = split[np.lexsort((-r.x[split], -weight[split]))]
    integer.fill_greedy(a, c, order, residual, assigned)
    single = np.flatnonzero((a.j_accelerators[job] == 1) & (assigned[job] < 0))
    integer.min_cost_flow_fill(a, c, single, residual, assigned)
    multi = np.flatnonzero((a.j_accelerators[job] > 1) & (assigned[job] < 0))
    integer.fill_greedy(a, c, multi[np.argsort(-weight[multi], kind="stable")], residual, assigned)
    return assigned


def _warm_prices(a: MarketArrays, warm: Warm | None) -> Floats:
    price = np.zeros(a.n_offers)
    if warm is not None and warm.offer_price:
        for o, offer in enumerate(a.offers):
            price[o] = warm.offer_price.get(offer.id, 0.0)
    return price


def _first_working_set(
    a: MarketArrays, pairs: FeasiblePairs, price: Floats, warm: Warm | None
) -> Ints:
    """Each job's most valuable pairs at ``price``, and the warm pairs still feasible."""
    value = pairs.weight - a.j_accelerators[pairs.job] * price[pairs.offer]
    first = top_per_job(pairs, value, FIRST_PER_JOB)
    if SPREAD_PER_JOB:
        # A few pairs spread over each job's feasible offers (evenly, in offer
        # order) let the first flow find the offers nobody's best pairs reach.
        counts = np.diff(pairs.start)
        k = np.minimum(counts, SPREAD_PER_JOB)
        job_of = np.repeat(np.arange(a.n_jobs), k)
        rank = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
        spread = pairs.start[job_of] + (rank * counts[job_of]) // np.maximum(k[job_of], 1)
        first = np.union1d(first, spread)
    if warm is None or not warm.pairs:
        return first
    job_index = {job.id: j for j, job in enumerate(a.jobs)}
    offer_index = {offer.id: o for o, offer in enumerate(a.offers)}
    keys = [
        job_index[j] * a.n_offers + offer_index[o]
        for j, o in warm.pairs
        if j in job_index and o in offer_index
    ]
    if not keys:
        return first
    return np.union1d(first, pair_indices(a, pairs, np.asarray(keys, dtype=np.int64)))
