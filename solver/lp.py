"""The LP relaxation of a round, solved with OR-Tools' GLOP, for rounds whose
jobs need several accelerators.

    max  sum_p w_p x_p
    s.t. sum_{p of job j}   x_p      <= 1         (a job runs at most once)
         sum_{p on offer o} a_j x_p  <= count_o   (no offer is oversold)
         0 <= x_p <= 1

With only one-accelerator jobs the flow's own prices are exact and much
faster; when bigger jobs matter the LP gives the true bound (its duals) and a
fractional answer that says which big jobs are worth placing where.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from ortools.linear_solver.python import model_builder as mb

from solver.pairs import FeasiblePairs
from solver.rules import Floats, Ints, MarketArrays

MAX_PAIRS = 100_000  # beyond this GLOP takes longer than the rounds it would save


@dataclass(frozen=True)
class LpSolution:
    x: Floats  # per feasible pair
    offer_price: Floats  # dual of each offer's row, per accelerator


def solve_lp(a: MarketArrays, pairs: FeasiblePairs, time_limit: float) -> LpSolution | None:
    """Solve the relaxation over every feasible pair; None if GLOP gives no optimum."""
    if pairs.size == 0 or pairs.size > MAX_PAIRS or time_limit <= 0:
        return None
    job, offer = pairs.job.astype(np.int64), pairs.offer.astype(np.int64)
    return _solve(a, job, offer, pairs.weight, a.o_count, time_limit)


def _solve(
    a: MarketArrays, job: Ints, offer: Ints, weight: Floats, capacity: Ints, time_limit: float
) -> LpSolution | None:
    n = len(job)
    columns = np.arange(n)
    matrix = sp.csr_matrix(
        (
            np.concatenate([np.ones(n), a.j_accelerators[job].astype(np.float64)]),
            (np.concatenate([job, a.n_jobs + offer]), np.concatenate([columns, columns])),
        ),
        shape=(a.n_jobs + a.n_offers, n),
    )
    model = mb.Model()
    helper: Any = model.helper  # its stub's array types do not match numpy's
    helper.fill_model_from_sparse_data(
        np.zeros(n),
        np.ones(n),
        weight.astype(np.float64),
        np.full(a.n_jobs + a.n_offers, -np.inf),
        np.concatenate([np.ones(a.n_jobs), capacity.astype(np.float64)]),
        matrix,
    )
    helper.set_maximize(True)
    solver = mb.Solver("glop")
    solver.set_time_limit_in_seconds(max(0.05, time_limit))
    if solver.solve(model) != mb.SolveStatus.OPTIMAL:
        return None
    x = np.clip(solver.values(model.get_variables()).to_numpy(), 0.0, 1.0)
    duals = solver.dual_values(model.get_linear_constraints()).to_numpy()
    return LpSolution(x=x, offer_price=np.maximum(duals[a.n_jobs :], 0.0))
