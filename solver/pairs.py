"""Feasible pairs: every (job, offer) the market rules allow, found in one pass.

The pass applies the rules to blocks of jobs against all offers (numpy) and
keeps only the feasible pairs, grouped by job like a CSR matrix: for a 20,000 x
5,000 market about a fifth of the 100 million pairs survive, a few hundred MB.
Everything later (candidates, pricing, the bound, the baseline) works on these
arrays without applying the rules again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from solver.rules import Floats, Ints, MarketArrays, evaluate


@dataclass(frozen=True)
class FeasiblePairs:
    start: Ints  # job j's pairs are [start[j], start[j + 1])
    job: Ints
    offer: Ints
    weight: Floats  # priority x placement value - cost

    @property
    def size(self) -> int:
        return len(self.offer)

    def row(self, j: int) -> slice:
        return slice(int(self.start[j]), int(self.start[j + 1]))


@dataclass
class Candidates:
    """The working set of pairs the optimiser assigns from; it grows by pricing."""

    job: Ints
    offer: Ints
    weight: Floats

    @property
    def size(self) -> int:
        return len(self.job)

    def add(self, job: Ints, offer: Ints, weight: Floats) -> int:
        """Add pairs not yet present; returns how many were new."""
        n_offers = int(max(self.offer.max(initial=0), offer.max(initial=0))) + 1
        known = np.isin(job * n_offers + offer, self.job * n_offers + self.offer)
        keep = ~known
        self.job = np.concatenate([self.job, job[keep]])
        self.offer = np.concatenate([self.offer, offer[keep]])
        self.weight = np.concatenate([self.weight, weight[keep]])
        return int(keep.sum())

    def keep_best(self, value: Floats, per_job: int, also: np.ndarray) -> None:
        """Keep each job's ``per_job`` pairs of highest ``value``, and those in ``also``."""
        keep = best_per_job(self.job, value, per_job) | also
        self.job, self.offer, self.weight = self.job[keep], self.offer[keep], self.weight[keep]


def best_per_job(job: Ints, value: Floats, per_job: int) -> np.ndarray:
    """A mask of each job's ``per_job`` entries of highest ``value``.

    One sort on a composite key (the job, then the value scaled into [0, 1))
    instead of a two-key lexsort, which is several times slower.
    """
    if len(job) == 0:
        return np.zeros(0, dtype=bool)
    low, high = float(value.min()), float(value.max())
    scaled = (value - low) / (high - low) if high > low else np.zeros(len(value))
    order = np.argsort(job + (1.0 - 0.999 * scaled), kind="stable")
    jobs = job[order]
    first = np.flatnonzero(np.diff(jobs, prepend=-1))
    rank = np.arange(len(order)) - np.repeat(first, np.diff(np.append(first, len(order))))
    mask = np.zeros(len(order), dtype=bool)
    mask[order[rank < per_job]] = True
    return mask


def scan(a: MarketArrays, k: int) -> tuple[FeasiblePairs, Candidates]:
    """All feasible pairs, and each job's ``k`` most valuable ones as first candidates."""
    offers: list[Ints] = []
    weights: list[Floats] = []
    counts: list[Ints] = []
    top_jobs: list[Ints] = []
    top_offers: list[Ints] = []
    top_weights: list[Floats] = []
    for block_jobs in a.blocks():
        block = evaluate(a, block_jobs)
        feasible = block.feasible
        weight = a.j_value[block_jobs][:, None] - block.cost
        rows, cols = np.nonzero(feasible)
        offers.append(cols.astype(np.int32))
        weights.append(weight[rows, cols])
        counts.append(feasible.sum(axis=1))
        r, c = top_per_row(weight, feasible, k)
        top_jobs.append(r + (block_jobs.start or 0))
        top_offers.append(c)
        top_weights.append(weight[r, c])
    n_per_job = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    start = np.concatenate([[0], np.cumsum(n_per_job)]).astype(np.int64)
    pairs = FeasiblePairs(
        start=start,
        job=np.repeat(np.arange(a.n_jobs, dtype=np.int32), n_per_job),
        offer=np.concatenate(offers) if offers else np.zeros(0, np.int32),
        weight=np.concatenate(weights) if weights else np.zeros(0),
    )
    candidates = Candidates(
        job=np.concatenate(top_jobs).astype(np.int64) if top_jobs else np.zeros(0, np.int64),
        offer=np.concatenate(top_offers).astype(np.int64) if top_offers else np.zeros(0, np.int64),
        weight=np.concatenate(top_weights) if top_weights else np.zeros(0),
    )
    return pairs, candidates


def top_per_row(values: Floats, allowed: np.ndarray, k: int) -> tuple[Ints, Ints]:
    """Row and column indices of the ``k`` largest allowed values of each row."""
    masked = np.where(allowed, values, -np.inf)
    k = min(k, masked.shape[1])
    if k == 0 or masked.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cols = np.argpartition(-masked, k - 1, axis=1)[:, :k]
    rows = np.repeat(np.arange(masked.shape[0]), k)
    cols = cols.ravel()
    ok = np.isfinite(masked[rows, cols])
    return rows[ok].astype(np.int64), cols[ok].astype(np.int64)
