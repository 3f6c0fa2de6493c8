"""Large-neighbourhood search: re-solve a few offers at a time exactly with CP-SAT.

Jobs that need several accelerators make a round a multiple-knapsack problem:
the LP's answer is nearly integral, but rounding its fractional part and
packing gangs around each other leaves value behind. Each step here frees a
*neighbourhood*, a handful of offers with every job placed on them and the
unplaced jobs that could use them, and lets CP-SAT re-pack it exactly, hinted
with the current answer. Whatever CP-SAT finds is kept only if it is better,
so the answer never gets worse.

Neighbourhoods start where the LP and the answer disagree most (offers the LP
fills with more value than the answer does), then take every other offer in
turn; each neighbourhood grows along the jobs that link its offers. Steps are
deterministic (CP-SAT with one worker and a deterministic time limit), so the
sequence of answers is the same on every machine; only the wall-clock
deadline decides where it stops.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from ortools.sat.python import cp_model

from solver.rules import Floats, Ints, MarketArrays

SCALE = 1e6  # integer objective units per USD
OFFERS_PER_STEP = 12  # offers freed at once, grown when a whole pass finds nothing
MAX_PAIRS_PER_STEP = 6_000
STEP_DETERMINISTIC_SECONDS = 0.05


class Pool:
    """The pairs the search may use: candidate pairs with their values, and the
    LP's value of each (0 for pairs the LP did not use), indexed by offer and job."""

    def __init__(self, a: MarketArrays, job: Ints, offer: Ints, weight: Floats, lp: Floats):
        self.job, self.offer, self.weight, self.lp = job, offer, weight, lp
        self.by_offer = np.argsort(offer, kind="stable")
        self.offer_start = np.searchsorted(offer[self.by_offer], np.arange(a.n_offers + 1))
        self.by_job = np.argsort(job, kind="stable")
        self.job_start = np.searchsorted(job[self.by_job], np.arange(a.n_jobs + 1))

    def on_offer(self, o: int) -> Ints:
        return self.by_offer[self.offer_start[o] : self.offer_start[o + 1]]

    def of_job(self, j: int) -> Ints:
        return self.by_job[self.job_start[j] : self.job_start[j + 1]]


def value_of(pool: Pool, assigned: Ints) -> float:
    return float(pool.weight[assigned[pool.job] == pool.offer].sum())


def search(
    a: MarketArrays,
    pool: Pool,
    assigned: Ints,
    bound: float,
    goal: float,
    deadline: float,
    on_better: Callable[[float], None] = lambda value: None,
) -> tuple[Ints, dict[str, float]]:
    """Improve ``assigned`` (every pair of it in ``pool``) until its value is
    within ``goal`` of ``bound``, or ``deadline``; returns it and step counts.
    ``on_better`` hears each better value."""
    assigned = assigned.copy()
    value = value_of(pool, assigned)
    stats = {"lns_steps": 0.0, "lns_improved": 0.0}
    size = OFFERS_PER_STEP
    budget = STEP_DETERMINISTIC_SECONDS
    while time.perf_counter() < deadline and bound - value > goal * abs(bound):
        improved_in_pass = False
        for seed in _seed_order(a, pool, assigned).tolist():
            if time.perf_counter() >= deadline or bound - value <= goal * abs(bound):
                break
            offers = _grow(pool, assigned, seed, size)
            stats["lns_steps"] += 1
            gained = _resolve(a, pool, assigned, offers, budget, deadline)
            if gained > 1e-9:
                value += gained
                on_better(value)
                stats["lns_improved"] += 1
                improved_in_pass = True
        if not improved_in_pass:
            # Nothing found in a whole pass: larger neighbourhoods, and once a
            # neighbourhood is every offer, longer searches.
            if size < a.n_offers:
                size *= 2
            else:
                budget *= 2
    return assigned, stats


def _seed_order(a: MarketArrays, pool: Pool, assigned: Ints) -> Ints:
    """Offers by how much more value the LP puts on them than the answer does."""
    lp_value = np.zeros(a.n_offers)
    np.add.at(lp_value, pool.offer, pool.lp * pool.weight)
    used = assigned[pool.job] == pool.offer
    have = np.zeros(a.n_offers)
    np.add.at(have, pool.offer[used], pool.weight[used])
    # Offers with room left that an unplaced job could use come next.
    room = a.o_count.astype(np.float64)
    np.subtract.at(room, assigned[assigned >= 0], a.j_accelerators[assigned >= 0])
    wanted = np.zeros(a.n_offers, dtype=bool)
    unplaced = assigned[pool.job] < 0
    wanted[pool.offer[unplaced]] = True
    score = (lp_value - have) + 1e-3 * (room > 0) * wanted
    return np.argsort(-score, kind="stable")


def _grow(pool: Pool, assigned: Ints, seed: int, size: int) -> list[int]:
    """``seed`` and up to ``size - 1`` offers linked to it by jobs that could move."""
    offers = [seed]
    taken = {seed}
    frontier = [seed]
    while frontier and len(offers) < size:
        o = frontier.pop(0)
        here = pool.on_offer(o)
        jobs = pool.job[here]
        movable = here[(assigned[jobs] == o) | (assigned[jobs] < 0)]
        # The jobs' other offers, those the LP likes best first.
        linked: dict[int, float] = {}
        for p in movable[np.argsort(-pool.lp[movable], kind="stable")].tolist()[:64]:
            for q in pool.of_job(int(pool.job[p])).tolist():
                other = int(pool.offer[q])
                if other not in taken:
                    linked[other] = max(linked.get(other, 0.0), float(pool.lp[q]) + 1e-6)
        for other, _ in sorted(linked.items(), key=lambda kv: (-kv[1], kv[0])):
            if len(offers) >= size:
                break
            taken.add(other)
            offers.append(other)
            frontier.append(other)
    return offers


def _resolve(
    a: MarketArrays,
    pool: Pool,
    assigned: Ints,
    offers: list[int],
    budget: float,
    deadline: float,
) -> float:
    """Re-pack ``offers`` exactly; apply and return the gain (0 when none)."""
    in_set = np.zeros(a.n_offers, dtype=bool)
    in_set[offers] = True
    ps = np.concatenate([pool.on_offer(o) for o in offers])
    jobs = pool.job[ps]
    # The jobs placed on these offers and the unplaced ones; jobs placed
    # elsewhere stay where they are.
    free = (assigned[jobs] < 0) | (in_set[np.maximum(assigned[jobs], 0)] & (assigned[jobs] >= 0))
    ps = ps[free]
    if len(ps) > MAX_PAIRS_PER_STEP:
        # Keep every pair in use, then the most valuable.
        used = assigned[pool.job[ps]] == pool.offer[ps]
        rest = ps[~used]
        rest = rest[np.argsort(-(pool.weight[rest] + 1e4 * pool.lp[rest]), kind="stable")]
        ps = np.concatenate([ps[used], rest[: MAX_PAIRS_PER_STEP - int(used.sum())]])
    if len(ps) == 0:
        return 0.0
    job, offer, weight = pool.job[ps], pool.offer[ps], pool.weight[ps]
    before = float(weight[assigned[job] == offer].sum())

    model = cp_model.CpModel()
    x = [model.new_bool_var(f"x{i}") for i in range(len(ps))]
    order = np.argsort(job, kind="stable")
    bounds = np.flatnonzero(np.diff(job[order], prepend=-1, append=-1))
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        if hi - lo > 1:
            model.add_at_most_one(x[i] for i in order[lo:hi].tolist())
    need = a.j_accelerators[job].tolist()
    order = np.argsort(offer, kind="stable")
    bounds = np.flatnonzero(np.diff(offer[order], prepend=-1, append=-1))
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        members = order[lo:hi].tolist()
        capacity = int(a.o_count[offer[members[0]]])
        if sum(need[i] for i in members) > capacity:
            model.add(sum(need[i] * x[i] for i in members) <= capacity)
    scaled = np.round(weight * SCALE).astype(np.int64).tolist()
    model.maximize(sum(w * v for w, v in zip(scaled, x, strict=True)))
    current = (assigned[job] == offer).tolist()
    for i, on in enumerate(current):
        model.add_hint(x[i], on)

    solver = cp_model.CpSolver()
    solver.parameters.max_deterministic_time = budget
    solver.parameters.max_time_in_seconds = max(0.05, deadline - time.perf_counter())
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return 0.0
    chosen = np.array([solver.boolean_value(v) for v in x], dtype=bool)
    after = float(weight[chosen].sum())
    if after <= before + 1e-9:
        return 0.0
    freed = np.unique(job)
    assigned[freed[assigned[freed] < 0]] = -1
    assigned[freed[np.isin(assigned[freed], offers)]] = -1
    assigned[job[chosen]] = offer[chosen]
    return after - before
