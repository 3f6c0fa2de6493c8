"""The LP relaxation of a round, solved with OR-Tools' GLOP.

    max  sum_p w_p x_p
    s.t. sum_{p of job j}   x_p        <= 1        (a job runs at most once)
         sum_{p on offer o} a_j x_p    <= count_o  (no offer is oversold)
         0 <= x_p <= 1

Its duals price each offer's accelerators; the optimiser uses the primal to
guide rounding and the prices to bound the round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from ortools.linear_solver.python import model_builder as mb

from solver.candidates import Candidates
from solver.rules import Floats, MarketArrays


@dataclass(frozen=True)
class LpSolution:
    x: Floats  # per candidate pair
    objective: float
    job_price: Floats  # dual of each job's row, per job (0 off the LP)
    offer_price: Floats  # dual of each offer's row, per accelerator (0 off the LP)


def solve_lp(a: MarketArrays, c: Candidates, time_limit: float) -> LpSolution | None:
    """Solve the relaxation over the candidate pairs; None if GLOP gives no optimum."""
    if c.size == 0:
        return LpSolution(np.zeros(0), 0.0, np.zeros(a.n_jobs), np.zeros(a.n_offers))
    jobs, job_row = np.unique(c.job, return_inverse=True)
    offers, offer_row = np.unique(c.offer, return_inverse=True)
    n_rows = len(jobs) + len(offers)
    pairs = np.arange(c.size)
    matrix = sp.csr_matrix(
        (
            np.concatenate([np.ones(c.size), a.j_accelerators[c.job].astype(np.float64)]),
            (np.concatenate([job_row, len(jobs) + offer_row]), np.concatenate([pairs, pairs])),
        ),
        shape=(n_rows, c.size),
    )
    model = mb.Model()
    helper: Any = model.helper  # its stub's array types do not match numpy's
    helper.fill_model_from_sparse_data(
        np.zeros(c.size),
        np.ones(c.size),
        c.weight.astype(np.float64),
        np.full(n_rows, -np.inf),
        np.concatenate([np.ones(len(jobs)), a.o_count[offers].astype(np.float64)]),
        matrix,
    )
    helper.set_maximize(True)
    solver = mb.Solver("glop")
    solver.set_time_limit_in_seconds(max(0.1, time_limit))
    status = solver.solve(model)
    if status != mb.SolveStatus.OPTIMAL:
        return None
    x = np.clip(solver.values(model.get_variables()).to_numpy(), 0.0, 1.0)
    duals = solver.dual_values(model.get_linear_constraints()).to_numpy()
    job_price = np.zeros(a.n_jobs)
    job_price[jobs] = np.maximum(duals[: len(jobs)], 0.0)
    offer_price = np.zeros(a.n_offers)
    offer_price[offers] = np.maximum(duals[len(jobs) :], 0.0)
    return LpSolution(x, float(solver.objective_value), job_price, offer_price)
