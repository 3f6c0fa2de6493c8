"""Clear a market: choose at most one offer per job, maximising the round's value.

The pipeline uses the problem's structure rather than one big integer model:

1. ``rules`` applies every market rule, vectorised over blocks of jobs x offers;
   ``pairs.scan`` keeps the feasible pairs, and each job's most valuable ones
   as the first candidates.
2. A round of one-accelerator jobs is a transportation problem:
   ``integer.assign`` solves it exactly by min-cost flow over the candidates,
   ``prices.prove`` turns the answer into offer prices (the LP dual) that bound
   the round over *all* feasible pairs, and pairs the prices say could do
   better join the candidates until none are left.
3. Gangs (jobs needing several accelerators on one offer) make the round a
   multiple-knapsack problem. ``relax`` solves its LP exactly, as a
   transportation problem in accelerators, by the same kind of column
   generation; that gives the true LP bound and an answer that is integral but
   for a few split gangs. ``relax.round_down`` makes it integral, and
   ``neighbourhood.search`` re-packs a few offers at a time with CP-SAT while
   the answer is further than ``GAP_GOAL`` from the bound and time remains
   (small rounds: CP-SAT over every pair, which can prove the optimum).
4. First-come-first-served (the peer baseline) is computed on the same pairs and
   kept if it is better, so a round never does worse than it.

Answers are deterministic for a given input and time limit on a given machine
when they stop at a goal: there is no randomness, and CP-SAT runs on one
worker with deterministic time limits. A round that runs out of time stops
where its clock says, so a slower machine can stop at an earlier answer.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from solver import exact, integer, neighbourhood, packing, prices, relax
from solver.fractions import is_fractional
from solver.market import Assignment, Market, Offer, Result
from solver.pairs import Candidates, FeasiblePairs, scan
from solver.relax import Warm
from solver.rules import Ints, MarketArrays, evaluate, evaluate_pairs, overhead_seconds

FIRST_CANDIDATES = 32  # per job, from the scan
ADDED_PER_ROUND = 32  # per job, from pricing
KEPT_PER_ROUND = 16  # per job, of the pairs already in the working set
# CP-SAT's first deterministic budget over every pair of a small round (doubled
# on each try that neither proves the optimum nor reaches the goal).
CP_SAT_BUDGET = 0.1
MAX_ROUNDS = 50
GAP_GOAL = 0.005  # rounds stop within 0.5 % of the bound, well inside the targets
LP_SHARE = 0.75  # of the time left after the scan, at most, for the LP of a round with gangs


def solve(market: Market, time_limit: float = 10.0, warm: Warm | None = None) -> Result:
    """Clear ``market`` in about ``time_limit`` seconds at most.

    ``warm`` is the previous round's ``Result.warm``: its LP working set and
    prices start this round's LP (it only speeds the round up; any value, stale
    or foreign, gives a correct answer).
    """
    if any(o.fraction_kind != "whole" for o in market.offers) or any(
        is_fractional(j) for j in market.jobs
    ):
        return _split(market, time_limit, warm)
    started = time.perf_counter()
    deadline = started + time_limit
    next_warm: Warm | None = None
    a = MarketArrays.build(market)
    if a.n_jobs == 0 or a.n_offers == 0:
        nothing = _result(a, np.full(a.n_jobs, -1, dtype=np.int64), 0.0, started, {})
        return replace(nothing, unplaceable=nothing.unassigned)

    pairs, cands = scan(a, FIRST_CANDIDATES)
    unplaceable = tuple(a.jobs[j].id for j in np.flatnonzero(np.diff(pairs.start) == 0).tolist())
    stats: dict[str, float] = {"feasible_pairs": float(pairs.size), "scanned_at": _since(started)}
    if pairs.size == 0:
        nothing = _result(a, np.full(a.n_jobs, -1, dtype=np.int64), 0.0, started, stats)
        return replace(nothing, unplaceable=unplaceable)
    if (a.j_accelerators > 1).any():
        # Gangs make the round a knapsack problem, which the flow's prices do
        # not bound: the LP over every pair gives the true bound and says which
        # gangs are worth placing where; the answer is rounded from it and then
        # improved a few offers at a time with CP-SAT.
        assigned, bound, next_warm = _knapsack(a, pairs, cands, warm, started, deadline, stats)
    else:
        assigned, bound = _transportation(a, pairs, cands, started, deadline, stats)
    value = integer.objective(cands, assigned)
    _Marks(started, bound, stats)(value)  # when not already marked on the way
    stats["candidates"] = float(cands.size)
    stats["improved_at"] = _since(started)
    baseline = integer.first_come(a, pairs)
    baseline_value = float(sum(_weights(a, pairs, baseline)))
    stats["baseline_objective"] = baseline_value
    if baseline_value > value:
        assigned = baseline
    result = _result(a, assigned, bound, started, stats)
    return replace(result, unplaceable=unplaceable, warm=next_warm)


def _split(market: Market, time_limit: float, warm: Warm | None) -> Result:
    """Fractional jobs into fractional offers (``packing``), the rest as usual.

    The two parts share no job and no offer, so their objectives and bounds add.
    Each part gets the clock in proportion to its jobs.
    """
    started = time.perf_counter()
    part = [j for j in market.jobs if is_fractional(j)]
    sliced = tuple(o for o in market.offers if o.fraction_kind != "whole")
    fractional = replace(market, offers=sliced, jobs=tuple(part))
    whole = replace(
        market,
        offers=tuple(o for o in market.offers if o.fraction_kind == "whole"),
        jobs=tuple(j for j in market.jobs if not is_fractional(j)),
    )
    share = time_limit * len(part) / max(1, len(market.jobs))
    if fractional.offers and fractional.jobs:
        f = packing.to_result(fractional, packing.pack(fractional, share), started)
    else:
        ids = tuple(j.id for j in fractional.jobs)
        f = Result("OPTIMAL", 0.0, 0.0, 0.0, (), ids, unplaceable=ids)
    singles = sum(1 for j in whole.jobs if j.accelerators == 1)
    views = _whole_views(sliced, f.assignments, singles)
    whole = replace(whole, offers=whole.offers + tuple(views.values()))
    w = solve(whole, max(0.1, time_limit - (time.perf_counter() - started)), warm)
    w = replace(w, assignments=tuple(_from_view(a, views) for a in w.assignments))
    assert f.bound is not None
    assert w.bound is not None
    optimal = f.status == w.status == "OPTIMAL"
    stats = dict(w.stats) | {"fractional_objective": f.objective, "fractional_bound": f.bound}
    return Result(
        status="OPTIMAL" if optimal else "FEASIBLE",
        objective=f.objective + w.objective,
        bound=f.bound + w.bound,
        solve_seconds=time.perf_counter() - started,
        assignments=w.assignments + f.assignments,
        unassigned=w.unassigned + f.unassigned,
        stats=stats,
        unplaceable=w.unplaceable + f.unplaceable,
        warm=w.warm,
        repartitions=f.repartitions,
    )


VIEW = "#gpu"  # a whole view's id: the shared offer's, this, and the GPU's number


def _whole_views(
    offers: tuple[Offer, ...], taken: tuple[Assignment, ...], limit: int
) -> dict[str, Offer]:
    """A shared offer's accelerators that no share of is held (nor placed this round),
    each as a whole one-accelerator offer: a whole job may take one, all its shares.
    One offer per accelerator, so a gang never spans shared accelerators; at most
    ``limit`` of each offer (the round's one-accelerator whole jobs: no more can be
    placed), so a big shared offer does not flood the round with views."""
    used = {(a.offer, a.slice.split()[-1]) for a in taken if "shared" in a.slice}
    views: dict[str, Offer] = {}
    for o in offers:
        if o.fraction_kind != "shared":
            continue
        free = 0
        for b in range(o.count):
            busy = o.shares_busy[b] if b < len(o.shares_busy) else 0
            if busy == 0 and (o.id, str(b)) not in used and free < limit:
                free += 1
                view_id = f"{o.id}{VIEW}{b}"
                views[view_id] = replace(
                    o, id=view_id, fraction_kind="whole", count=1, shares_busy=()
                )
    return views


def _from_view(a: Assignment, views: dict[str, Offer]) -> Assignment:
    """An assignment to a whole view as the shared offer's: every share of its GPU."""
    view = views.get(a.offer)
    if view is None:
        return a
    offer, _, gpu = a.offer.rpartition(VIEW)
    return replace(a, offer=offer, slice=f"{view.shares}/{view.shares} shared on GPU {gpu}")


def _transportation(
    a: MarketArrays,
    pairs: FeasiblePairs,
    cands: Candidates,
    started: float,
    deadline: float,
    stats: dict[str, float],
) -> tuple[Ints, float]:
    """One-accelerator jobs only: exact by min-cost flow over candidates that
    pricing rounds grow until the flow's prices prove it optimal over every pair."""
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
        # Stop while there is time for another round and the result after it.
        if time.perf_counter() + 3 * last_round + _reserve(a) > deadline:
            break
        if bound - integer.objective(cands, assigned) <= GAP_GOAL * bound:
            break  # close enough to the bound: more rounds would not pay
        # The working set follows the prices: each job keeps the pairs that are
        # best at current prices (and its own), plus the newly improving ones.
        here = assigned[cands.job] == cands.offer
        net = cands.weight - price[cands.offer]
        cands.keep_best(net, KEPT_PER_ROUND, here)
        if cands.add(jobs, offers, weights) == 0:
            break  # the prices point only at pairs the optimiser already has
        assigned = integer.assign(a, cands)
    assert bound is not None
    stats.update(rounds=float(rounds), rounds_done_at=_since(started))
    return assigned, bound


def _knapsack(
    a: MarketArrays,
    pairs: FeasiblePairs,
    cands: Candidates,
    warm: Warm | None,
    started: float,
    deadline: float,
    stats: dict[str, float],
) -> tuple[Ints, float, Warm | None]:
    """The LP, its rounding and the neighbourhood search, for rounds with gangs.

    Returns the answer, the bound and what the next round starts its LP from;
    ``cands`` gains the LP's pairs (the answer is always made of candidates).
    """
    reserve = _reserve(a)
    lp_deadline = time.perf_counter() + LP_SHARE * (deadline - time.perf_counter() - reserve)
    lp = relax.relax(a, pairs, lp_deadline, warm=warm)
    assert lp is not None  # there are pairs: solve() answered the round without any
    bound = lp.bound
    stats.update(
        lp_iterations=float(lp.iterations),
        lp_complete=float(lp.complete),
        lp_pairs=float(len(lp.working)),
        lp_done_at=_since(started),
    )
    cands.add(
        pairs.job[lp.working].astype(np.int64),
        pairs.offer[lp.working].astype(np.int64),
        pairs.weight[lp.working],
    )
    x = np.zeros(pairs.size)
    x[lp.working] = lp.x
    lp_x = _on_candidates(a, pairs, x, cands)
    marks = _Marks(started, bound, stats)
    assigned = relax.round_down(a, pairs, lp)
    marks(integer.objective(cands, assigned))
    stats["rounded_at"] = _since(started)
    if pairs.size <= exact.MAX_PAIRS:
        # Small rounds: CP-SAT over every feasible pair, which can prove the optimum.
        assigned, bound = _exact(a, pairs, cands, assigned, bound, deadline - reserve, marks)
    else:
        pool = neighbourhood.Pool(a, cands.job, cands.offer, cands.weight, lp_x)
        assigned, steps = neighbourhood.search(
            a, pool, assigned, bound, GAP_GOAL, deadline - reserve, on_better=marks
        )
        stats.update(steps)
    stats["searched_at"] = _since(started)
    return assigned, bound, relax.warm_from(a, pairs, lp)


def _exact(
    a: MarketArrays,
    pairs: FeasiblePairs,
    cands: Candidates,
    assigned: Ints,
    bound: float,
    deadline: float,
    marks: _Marks,
) -> tuple[Ints, float]:
    """CP-SAT over every pair, hinted with ``assigned``: once to prove the optimum
    if it can, then with twice the budget each time while the answer is not
    within the goal of the bound, until ``deadline``. ``cands`` gains the pairs
    of the answer."""
    every = Candidates(pairs.job.astype(np.int64), pairs.offer.astype(np.int64), pairs.weight)
    value = integer.objective(every, assigned)
    budget = CP_SAT_BUDGET
    tries = 0
    while time.perf_counter() < deadline and bound - value > (
        GAP_GOAL * abs(bound) if tries else 1e-9 * max(1.0, abs(bound))
    ):
        tries += 1
        answer = exact.improve(
            a,
            every,
            assigned,
            deterministic_seconds=budget,
            wall_seconds=deadline - time.perf_counter(),
        )
        if answer is None:
            break
        if integer.objective(every, answer.assigned) > value:
            assigned = answer.assigned
            value = integer.objective(every, assigned)
            marks(value)
        if answer.optimal:
            # Up to the rounding of CP-SAT's integer weights, its bound is the round's.
            slack = exact.ROUNDING_USD * a.n_jobs
            bound = min(bound, max(answer.bound + slack, value))
            break
        budget *= 2
    used = integer.pairs_of(every, assigned)
    cands.add(every.job[used], every.offer[used], every.weight[used])
    return assigned, bound


class _Marks:
    """Records in ``stats`` when the answer first came within 2 % and 1 % of ``bound``."""

    def __init__(self, started: float, bound: float, stats: dict[str, float]):
        self.started, self.bound, self.stats = started, bound, stats

    def __call__(self, value: float) -> None:
        for goal, key in ((0.02, "within_2pct_at"), (0.01, "within_1pct_at")):
            if key not in self.stats and self.bound - value <= goal * abs(self.bound):
                self.stats[key] = _since(self.started)


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
    startup = overhead_seconds(a, jobs, offers)
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
            startup_seconds=float(startup[i]),
            energy_kwh=float(block.energy[i]),
            gco2=float(block.gco2[i]),
            carbon_usd=float(block.carbon[i]),
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
