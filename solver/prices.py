"""Offer prices: the LP dual that proves an assignment optimal, and the bound it gives.

For one-accelerator jobs a round is a transportation problem, whose LP
relaxation is integral. Its dual gives every offer a price ``pi_o >= 0`` per
accelerator and every job a surplus ``u_j >= 0`` with ``u_j + a_j pi_o >= w_jo``.
By weak duality, for *any* prices,

    bound(pi) = sum_j max(0, max_o (w_jo - a_j pi_o)) + sum_o count_o pi_o

is an upper bound on the round: the LP bound, reached with the optimal prices.

``prove`` derives prices from an assignment by complementary slackness: an
unplaced job's candidates must cost at least its value to it, and a placed job
must not gain by moving, so ``pi_o' >= pi_o + w_jo' - w_jo`` along each
possible move. The smallest such prices are longest paths in the graph of
moves between offers, found by Bellman-Ford rounds over numpy arrays.
"""

from __future__ import annotations

import numpy as np

from solver.pairs import Candidates, FeasiblePairs, best_per_job
from solver.rules import Floats, Ints, MarketArrays

TOLERANCE_USD = 1e-3  # cycles smaller than this come from rounding costs to micro-dollars


def prove(a: MarketArrays, c: Candidates, assigned: Ints, max_rounds: int = 10_000) -> Floats:
    """The smallest offer prices consistent with ``assigned`` over the candidates."""
    unit = a.j_accelerators[c.job] == 1
    placed = assigned[c.job] >= 0
    here = assigned[c.job] == c.offer
    price = np.zeros(a.n_offers)
    waiting = unit & ~placed
    np.maximum.at(price, c.offer[waiting], c.weight[waiting])

    current = np.zeros(a.n_jobs)
    current[c.job[here]] = c.weight[here]
    moves = unit & placed & ~here
    src = assigned[c.job[moves]]
    dst = c.offer[moves]
    gain = c.weight[moves] - current[c.job[moves]]
    order = np.argsort(dst, kind="stable")
    src, dst, gain = src[order], dst[order], gain[order]
    heads = np.flatnonzero(np.diff(dst, prepend=-1))
    if len(heads) == 0:
        return price
    targets = dst[heads]
    for _ in range(max_rounds):
        reach = np.maximum.reduceat(price[src] + gain, heads)
        raised = reach > price[targets] + TOLERANCE_USD
        if not raised.any():
            break
        price[targets[raised]] = reach[raised]
    return price


def bound(
    a: MarketArrays, pairs: FeasiblePairs, price: Floats, need: Floats | None = None
) -> tuple[float, Floats]:
    """The upper bound for ``price``, and every pair's value net of the prices.

    ``need``, each pair's accelerators, saves looking them up again when given."""
    if need is None:
        need = a.j_accelerators[pairs.job].astype(np.float64)
    reduced = price[pairs.offer]
    reduced *= need
    np.subtract(pairs.weight, reduced, out=reduced)
    best = np.zeros(a.n_jobs)
    nonempty = np.flatnonzero(np.diff(pairs.start) > 0)
    if len(nonempty):
        best[nonempty] = np.maximum(np.maximum.reduceat(reduced, pairs.start[nonempty]), 0.0)
    return float(best.sum() + (a.o_count * price).sum()), reduced


def improving(
    a: MarketArrays,
    pairs: FeasiblePairs,
    reduced: Floats,
    c: Candidates,
    assigned: Ints,
    price: Floats,
    per_job: int,
) -> tuple[Ints, Ints, Floats]:
    """Pairs worth more to their job, at these prices, than what it has now."""
    have = np.zeros(a.n_jobs)
    here = assigned[c.job] == c.offer
    have[c.job[here]] = c.weight[here] - a.j_accelerators[c.job[here]] * price[c.offer[here]]
    better = np.flatnonzero(reduced > have[pairs.job] + TOLERANCE_USD)
    if len(better) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    chosen = better[best_per_job(pairs.job[better].astype(np.int64), reduced[better], per_job)]
    return (
        pairs.job[chosen].astype(np.int64),
        pairs.offer[chosen].astype(np.int64),
        pairs.weight[chosen],
    )


def prove_units(a: MarketArrays, pairs: FeasiblePairs, working: Ints, y: Floats) -> Floats:
    """The smallest offer prices that prove the flow ``y`` (accelerators per working
    pair) optimal for the LP over the working set, gangs included.

    Per accelerator, pair ``p`` of job ``j`` is worth ``v_p = w_p / a_j``, and the
    LP's dual asks ``u_j + pi_o >= v_p`` with equality where ``y_p > 0``. A job
    not wholly placed has ``u_j = 0``, so each of its pairs sets a floor
    ``pi_o >= v_p``; a placed job's offer ``o`` and any other pair ``q`` of it give
    ``pi_q >= pi_o + v_q - v_p``. Longest paths from the floors, as in ``prove``.
    """
    job = pairs.job[working].astype(np.int64)
    offer = pairs.offer[working].astype(np.int64)
    need = a.j_accelerators[job]
    value = pairs.weight[working] / need
    placed = np.zeros(a.n_jobs)
    np.add.at(placed, job, y)
    whole = placed[job] >= need
    price = np.zeros(a.n_offers)
    np.maximum.at(price, offer[~whole], value[~whole])

    # Moves: from each used pair of a wholly placed job to each other pair of it.
    start = np.searchsorted(job, np.arange(a.n_jobs + 1))  # working is sorted by job
    used = np.flatnonzero((y > 0) & whole)
    lengths = start[job[used] + 1] - start[job[used]]
    src_pair = np.repeat(used, lengths)
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    dst_pair = np.repeat(start[job[used]], lengths) + offsets
    other = dst_pair != src_pair
    src_pair, dst_pair = src_pair[other], dst_pair[other]
    src, dst = offer[src_pair], offer[dst_pair]
    gain = value[dst_pair] - value[src_pair]
    order = np.argsort(dst, kind="stable")
    src, dst, gain = src[order], dst[order], gain[order]
    heads = np.flatnonzero(np.diff(dst, prepend=-1))
    if len(heads) == 0:
        return price
    targets = dst[heads]
    for _ in range(10_000):
        reach = np.maximum.reduceat(price[src] + gain, heads)
        raised = reach > price[targets] + TOLERANCE_USD
        if not raised.any():
            break
        price[targets[raised]] = reach[raised]
    return price
