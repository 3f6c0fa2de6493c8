"""CP-SAT over candidate pairs: exact on small rounds, an improver on larger ones.

Min-cost flow is exact when every job needs one accelerator. Jobs that need
several turn the round into a multiple-knapsack problem; on those rounds CP-SAT
starts from the best assignment found so far (as a hint) and improves it.
The search is bounded by deterministic time, so the answer does not depend on
how busy the machine is.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from solver.integer import pairs_of
from solver.pairs import Candidates
from solver.rules import Ints, MarketArrays

SCALE = 1e6  # integer objective units per USD
ROUNDING_USD = 0.5 / SCALE  # the most rounding to integers moves one job's weight
MAX_PAIRS = 20_000  # beyond this, building and searching the model costs more than it gains


@dataclass(frozen=True)
class CpSatAnswer:
    assigned: Ints
    bound: float  # over the candidate pairs
    optimal: bool


def improve(
    a: MarketArrays,
    c: Candidates,
    start: Ints,
    deterministic_seconds: float,
    wall_seconds: float,
) -> CpSatAnswer | None:
    """Improve ``start`` over the candidate pairs.

    The search stops after ``deterministic_seconds`` of CP-SAT's deterministic
    time, so the answer is the same on every run; ``wall_seconds`` is only a
    safety net for an overloaded machine.
    """
    if c.size == 0 or c.size > MAX_PAIRS or deterministic_seconds <= 0:
        return None
    model = cp_model.CpModel()
    x = [model.new_bool_var(f"x{p}") for p in range(c.size)]
    job_order = np.argsort(c.job, kind="stable")
    job_bounds = np.flatnonzero(np.diff(c.job[job_order], prepend=-1, append=-1))
    for lo, hi in itertools.pairwise(job_bounds):
        model.add_at_most_one(x[p] for p in job_order[lo:hi].tolist())
    need = a.j_accelerators[c.job].tolist()
    offer_order = np.argsort(c.offer, kind="stable")
    offer_bounds = np.flatnonzero(np.diff(c.offer[offer_order], prepend=-1, append=-1))
    for lo, hi in itertools.pairwise(offer_bounds):
        members = offer_order[lo:hi].tolist()
        capacity = int(a.o_count[c.offer[members[0]]])
        if sum(need[p] for p in members) > capacity:
            model.add(sum(need[p] * x[p] for p in members) <= capacity)
    weights = np.round(c.weight * SCALE).astype(np.int64).tolist()
    model.maximize(sum(w * v for w, v in zip(weights, x, strict=True)))
    chosen = set(pairs_of(c, start).tolist())
    for p in range(c.size):
        model.add_hint(x[p], p in chosen)

    solver = cp_model.CpSolver()
    solver.parameters.max_deterministic_time = deterministic_seconds
    solver.parameters.max_time_in_seconds = max(0.1, wall_seconds)
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    assigned = np.full(a.n_jobs, -1, dtype=np.int64)
    for p in range(c.size):
        if solver.boolean_value(x[p]):
            assigned[c.job[p]] = c.offer[p]
    return CpSatAnswer(
        assigned=assigned,
        bound=solver.best_objective_bound / SCALE,
        optimal=status == cp_model.OPTIMAL,
    )
