"""Candidate pairs: the feasible (job, offer) pairs worth giving to the optimiser.

A job usually has hundreds of feasible offers; the optimum uses one of its
cheapest few unless capacity is contested. ``Candidates`` keeps the ``k`` most
valuable pairs per job; pricing (``price_out``) later checks every feasible
pair against the LP's offer prices and adds back any that could improve the
round, so pruning never weakens the reported bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from solver.rules import Floats, Ints, MarketArrays, evaluate


@dataclass
class Candidates:
    job: Ints
    offer: Ints
    weight: Floats  # priority x placement value - cost
    feasible_per_job: Ints

    @property
    def size(self) -> int:
        return len(self.job)

    def extend(self, job: Ints, offer: Ints, weight: Floats) -> None:
        known = set(zip(self.job.tolist(), self.offer.tolist(), strict=True))
        keep = np.array(
            [(j, o) not in known for j, o in zip(job.tolist(), offer.tolist(), strict=True)],
            dtype=bool,
        )
        if keep.any():
            self.job = np.concatenate([self.job, job[keep]])
            self.offer = np.concatenate([self.offer, offer[keep]])
            self.weight = np.concatenate([self.weight, weight[keep]])
            order = np.lexsort((self.offer, self.job))
            self.job, self.offer, self.weight = (
                self.job[order],
                self.offer[order],
                self.weight[order],
            )


def top_pairs(weights: Floats, feasible: np.ndarray, k: int) -> tuple[Ints, Ints]:
    """Row and column indices of the ``k`` largest feasible weights of each row."""
    masked = np.where(feasible, weights, -np.inf)
    k = min(k, masked.shape[1])
    if k == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    cols = np.argpartition(-masked, k - 1, axis=1)[:, :k]
    rows = np.repeat(np.arange(masked.shape[0]), k)
    cols = cols.ravel()
    ok = np.isfinite(masked[rows, cols])
    return rows[ok], cols[ok]


def build(a: MarketArrays, k: int) -> Candidates:
    jobs, offers, weights, counts = [], [], [], []
    for block_jobs in a.blocks():
        block = evaluate(a, block_jobs)
        feasible = block.feasible
        weight = a.j_value[block_jobs][:, None] - block.cost
        rows, cols = top_pairs(weight, feasible, k)
        jobs.append(rows + block_jobs.start)
        offers.append(cols)
        weights.append(weight[rows, cols])
        counts.append(feasible.sum(axis=1))
    if not jobs:
        empty = np.empty(0, np.int64)
        return Candidates(empty, empty, np.empty(0), empty)
    job, offer = np.concatenate(jobs), np.concatenate(offers)
    order = np.lexsort((offer, job))
    return Candidates(
        job=job[order],
        offer=offer[order],
        weight=np.concatenate(weights)[order],
        feasible_per_job=np.concatenate(counts).astype(np.int64),
    )


def price_out(a: MarketArrays, offer_price: Floats, k: int) -> tuple[Floats, Ints, Ints, Floats]:
    """Check every feasible pair against offer prices ``offer_price`` (per accelerator).

    Returns each job's best reduced value ``max(0, max_o w - a*price_o)`` (which
    gives a valid upper bound on the round for any non-negative prices), and the
    ``k`` best pairs per job by reduced value, to add as candidates.
    """
    best = np.zeros(a.n_jobs)
    jobs, offers, weights = [], [], []
    for block_jobs in a.blocks():
        block = evaluate(a, block_jobs)
        weight = a.j_value[block_jobs][:, None] - block.cost
        reduced = weight - a.j_accelerators[block_jobs][:, None] * offer_price[None, :]
        feasible = block.feasible
        masked = np.where(feasible, reduced, -np.inf)
        if masked.shape[1]:
            best[block_jobs] = np.maximum(masked.max(axis=1), 0.0)
        rows, cols = top_pairs(reduced, feasible & (reduced > 0), k)
        jobs.append(rows + block_jobs.start)
        offers.append(cols)
        weights.append(weight[rows, cols])
    if not jobs:
        empty = np.empty(0, np.int64)
        return best, empty, empty, np.empty(0)
    return best, np.concatenate(jobs), np.concatenate(offers), np.concatenate(weights)
