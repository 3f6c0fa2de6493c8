"""Integer assignments from candidate pairs.

- ``min_cost_flow``: exact when every job needs one accelerator (a transportation
  problem), with OR-Tools' min-cost flow.
- ``assign``: a round of one-accelerator jobs, exactly, by min-cost flow;
- ``fill_greedy``: pairs in a given order, each placed where room is left (the
  LP's rounding, ``solver.relax.round_down``, uses both).
- ``first_come``: each job in submission order takes its cheapest feasible
  offer with room left: the peer baseline, and a safety net.

Each returns ``assigned``: per job, the index of its offer, or -1.
"""

from __future__ import annotations

import numpy as np
from ortools.graph.python import min_cost_flow

from solver.pairs import Candidates, FeasiblePairs
from solver.rules import Ints, MarketArrays

_SCALES = (1e6, 1e3, 1.0)  # integer cost units per USD, finest first


def objective(c: Candidates, assigned: Ints) -> float:
    """The round's value of an assignment, from its candidate pairs' weights."""
    return float(c.weight[pairs_of(c, assigned)].sum())


def pairs_of(c: Candidates, assigned: Ints) -> Ints:
    """Indices of the candidate pairs an assignment uses."""
    return np.nonzero(assigned[c.job] == c.offer)[0]


def min_cost_flow_fill(
    a: MarketArrays, c: Candidates, subset: Ints, residual: Ints, assigned: Ints
) -> None:
    """Assign the jobs of candidate pairs ``subset`` (all needing one accelerator)
    to maximise their total weight within ``residual`` capacity. Exact."""
    if len(subset) == 0:
        return
    jobs, job_node = np.unique(c.job[subset], return_inverse=True)
    offers, offer_node = np.unique(c.offer[subset], return_inverse=True)
    n_jobs, n_offers = len(jobs), len(offers)
    source, sink = 0, n_jobs + n_offers + 1
    job_nodes = 1 + np.arange(n_jobs)
    offer_nodes = 1 + n_jobs + np.arange(n_offers)
    tails = np.concatenate([np.zeros(n_jobs), 1 + job_node, offer_nodes, [source]])
    heads = np.concatenate([job_nodes, 1 + n_jobs + offer_node, np.full(n_offers, sink), [sink]])
    capacities = np.concatenate([np.ones(n_jobs), np.ones(len(subset)), residual[offers], [n_jobs]])
    first_pair_arc = n_jobs
    for scale in _SCALES:
        costs = np.concatenate(
            [
                np.zeros(n_jobs),
                -np.round(c.weight[subset] * scale),
                np.zeros(n_offers),
                [0],
            ]
        )
        flow = min_cost_flow.SimpleMinCostFlow()
        flow.add_arcs_with_capacity_and_unit_cost(
            tails.astype(np.int32),
            heads.astype(np.int32),
            capacities.astype(np.int64),
            costs.astype(np.int64),
        )
        flow.set_nodes_supplies(
            np.array([source, sink], dtype=np.int32), np.array([n_jobs, -n_jobs], dtype=np.int64)
        )
        if flow.solve() == flow.OPTIMAL:
            arcs = np.arange(first_pair_arc, first_pair_arc + len(subset))
            used = subset[flow.flows(arcs) > 0]
            assigned[c.job[used]] = c.offer[used]
            np.subtract.at(residual, c.offer[used], 1)
            return
    raise RuntimeError("min-cost flow failed at every cost scale")


def fill_greedy(
    a: MarketArrays, c: Candidates, order: Ints, residual: Ints, assigned: Ints
) -> None:
    """Walk candidate pairs in ``order``; place each still-unplaced job that fits."""
    need = a.j_accelerators
    for p in order.tolist():
        j, o = int(c.job[p]), int(c.offer[p])
        if assigned[j] < 0 and residual[o] >= need[j]:
            assigned[j] = o
            residual[o] -= need[j]


def assign(a: MarketArrays, c: Candidates) -> Ints:
    """The best assignment over the candidates of a round of one-accelerator jobs: exact,
    by min-cost flow. (Rounds with gangs are solved from their LP: ``solver.relax``.)"""
    assigned = np.full(a.n_jobs, -1, dtype=np.int64)
    residual = a.o_count.copy()
    min_cost_flow_fill(a, c, np.flatnonzero(a.j_accelerators[c.job] == 1), residual, assigned)
    return assigned


def first_come(a: MarketArrays, pairs: FeasiblePairs) -> Ints:
    """Jobs in submission order, each taking its cheapest feasible offer with room."""
    assigned = np.full(a.n_jobs, -1, dtype=np.int64)
    residual = a.o_count.copy()
    need = a.j_accelerators
    for j in range(a.n_jobs):
        row = pairs.row(j)
        offers = pairs.offer[row]
        if len(offers) == 0:
            continue
        room = residual[offers] >= need[j]
        if room.any():
            # The most valuable pair of a job is its cheapest.
            best = int(offers[np.flatnonzero(room)[np.argmax(pairs.weight[row][room])]])
            assigned[j] = best
            residual[best] -= need[j]
    return assigned
