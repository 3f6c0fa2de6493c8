"""Fractional-GPU markets: jobs sized as the trace's ``gpu_milli``, GPUs sold in slices or shares.

The jobs are the Alibaba GPU-sharing trace's single-GPU tasks (``jobs.csv``):
each asks ``gpu_milli / 1000`` of one GPU (compute and memory), so 57 % ask
for a whole GPU and the rest for 0.05 to 0.95 of one. Half accept shared
(time-sliced) capacity. The GPUs are the price sample's MIG-capable models
(A100, H100) at their real prices and places: 60 % in MIG mode, idle, each
already cut into one of the layouts operators commonly use; 40 % shared in
tenths (a share is 0.1 of the compute and memory), at 80 % of the price. There
are about four jobs per GPU, so capacity is short and packing matters.

Three ways to fill the same GPUs are compared:

- ``solver``: the clearing solver (re-cuts idle MIG GPUs when that sells more);
- ``whole-GPU``: today's market, where every job takes a whole GPU;
- ``first-fit``: jobs in arrival order, each into the first free MIG instance
  or run of shares that fits it, MIG layouts as they are.

*Stranded* is the share of the capacity of the GPUs a method sold anything on
that its jobs do not use: 1 - (sum of placed jobs' ``gpu_milli``) / (GPUs touched).
It has two parts, reported apart: capacity *idle inside slices* (sold, paid for,
but bigger than the job's ask: a 0.32 job in a 3g = 0.43 instance) and capacity
*unsold* on those GPUs (fragments no waiting job took).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

from adapters import mig
from benchmarks.markets import _offers, _read_csv
from solver import Job, Market, Offer, solve
from solver.fractions import Gpu, fits_profile, shares_needed

MIG_SHARE = 0.6
SHARES = 10
SHARED_DISCOUNT = 0.8
# Layouts as (compute slices, start); each GPU in MIG mode starts in one of these.
LAYOUTS = (
    ((7, 0),),
    ((3, 0), (3, 4)),
    ((4, 0), (2, 4), (1, 6)),
    ((2, 0), (2, 2), (2, 4), (1, 6)),
    tuple((1, s) for s in range(7)),
)


@dataclass(frozen=True)
class Fill:
    placed: int
    stranded: float
    gpus_touched: int
    seconds: float
    idle_in_slices: float = 0.0  # of the GPUs touched: sold, but beyond the jobs' asks
    unsold: float = 0.0  # of the GPUs touched: not sold


def _layout(model: str, shape: tuple[tuple[int, int], ...]) -> tuple[str, ...]:
    by_compute: dict[int, str] = {}
    for p in sorted(mig.profiles(model), key=lambda p: -p.memory_gib):
        by_compute[p.compute] = p.name  # the smallest memory of each compute size
    return tuple(f"{by_compute[c]}@{s}" for c, s in shape)


def build(n_jobs: int, n_gpus: int, seed: int = 0) -> tuple[Market, dict[str, float]]:
    """The market, and each job's ``gpu_milli / 1000``."""
    rng = random.Random(seed)
    pool = [o for o in _offers(4 * n_gpus, rng) if mig.profiles(o.accelerator)]
    gpus: list[Offer] = []
    for i in range(n_gpus):
        o = replace(pool[i % len(pool)], id=f"g{i}", count=1, available_hours=None)
        if rng.random() < MIG_SHARE:
            shape = LAYOUTS[rng.randrange(len(LAYOUTS))]
            gpus.append(
                replace(
                    o,
                    fraction_kind="mig",
                    mig_profiles=mig.specs(o.accelerator),
                    mig_instances=_layout(o.accelerator, shape),
                )
            )
        else:
            price = round(o.price_per_hour * SHARED_DISCOUNT, 6)
            gpus.append(replace(o, fraction_kind="shared", shares=SHARES, price_per_hour=price))
    rows = [r for r in _read_csv("jobs.csv") if int(r["num_gpus"]) <= 1 and int(r["gpu_milli"])]
    jobs: list[Job] = []
    sizes: dict[str, float] = {}
    for i in range(n_jobs):
        r = rows[rng.randrange(len(rows))]
        f = int(r["gpu_milli"]) / 1000
        sizes[f"j{i}"] = f
        jobs.append(
            Job(
                id=f"j{i}",
                platforms=("cuda",),
                max_price_per_hour=100.0,
                duration_hours=round(min(24.0, max(0.1, float(r["duration_s"]) / 3600)), 3),
                fraction=f,
                accepts_shared=rng.random() < 0.5,
            )
        )
    return Market(offers=tuple(gpus), jobs=tuple(jobs)), sizes


def _fill(
    placed: dict[str, str], share: dict[str, float], sizes: dict[str, float], seconds: float
) -> Fill:
    """``placed``: job -> GPU; ``share``: the part of its GPU each job's slice is."""
    touched = set(placed.values())
    if not touched:
        return Fill(0, 0.0, 0, seconds)
    used = sum(sizes[j] for j in placed)
    sold = sum(share[j] for j in placed)
    n = len(touched)
    return Fill(len(placed), 1 - used / n, n, seconds, (sold - used) / n, 1 - sold / n)


def by_solver(market: Market, sizes: dict[str, float], time_limit: float) -> Fill:
    result = solve(market, time_limit=time_limit)
    placed = {a.job: a.offer for a in result.assignments}
    share = {a.job: a.share for a in result.assignments}
    return _fill(placed, share, sizes, result.solve_seconds)


def whole_gpu(market: Market, sizes: dict[str, float], time_limit: float) -> Fill:
    """Every job takes one whole GPU (the market before fractions)."""
    whole = Market(
        offers=tuple(
            replace(o, fraction_kind="whole", mig_profiles=(), mig_instances=(), shares=0)
            for o in market.offers
        ),
        jobs=tuple(replace(j, fraction=None, accepts_shared=False) for j in market.jobs),
        weights=market.weights,
    )
    result = solve(whole, time_limit=time_limit)
    placed = {a.job: a.offer for a in result.assignments}
    return _fill(placed, dict.fromkeys(placed, 1.0), sizes, result.solve_seconds)


def first_fit(market: Market, sizes: dict[str, float]) -> Fill:
    """Jobs in order, each into the first free instance (or shares) that fits; no re-cutting."""
    free = {o.id: list(Gpu.of(o).existing) for o in market.offers if o.fraction_kind == "mig"}
    left = {o.id: o.shares for o in market.offers if o.fraction_kind == "shared"}
    placed: dict[str, str] = {}
    share: dict[str, float] = {}
    for j in market.jobs:
        for o in market.offers:
            if o.fraction_kind == "mig":
                gpu = Gpu.of(o)
                hit = next(
                    (
                        k
                        for k, (n, _) in enumerate(free[o.id])
                        if fits_profile(j, o, gpu.profiles[n])
                    ),
                    None,
                )
                if hit is not None:
                    name, _ = free[o.id].pop(hit)
                    placed[j.id], share[j.id] = o.id, gpu.profiles[name].share
                    break
            else:
                k = shares_needed(j, o)
                if k is not None and left[o.id] >= k:
                    left[o.id] -= k
                    placed[j.id], share[j.id] = o.id, k / o.shares
                    break
    return _fill(placed, share, sizes, 0.0)


def run(
    n_jobs: int, n_gpus: int, seed: int, time_limit: float, idle_weight: float | None = None
) -> dict[str, Any]:
    """One market three ways; ``idle_weight``: the solver's ``slice_idle_weight``
    (None: the default)."""
    market, sizes = build(n_jobs, n_gpus, seed)
    if idle_weight is not None:
        weights = replace(market.weights, slice_idle_weight=idle_weight)
        market = replace(market, weights=weights)
    ours = by_solver(market, sizes, time_limit)
    whole = whole_gpu(market, sizes, time_limit)
    ff = first_fit(market, sizes)
    return {
        "size": f"{n_jobs}x{n_gpus}",
        "fractional_jobs": sum(f < 1 for f in sizes.values()) / len(sizes),
        "solver": ours.__dict__,
        "whole_gpu": whole.__dict__,
        "first_fit": ff.__dict__,
        "placed_vs_whole": ours.placed / max(1, whole.placed),
        "stranded_vs_first_fit": ours.stranded / ff.stranded if ff.stranded else None,
    }


HEAD = (
    f"{'size':>9} {'method':>10} {'placed':>7} {'GPUs used':>10} {'stranded':>9} "
    f"{'in slices':>9} {'unsold':>7} {'seconds':>8}"
)


def lines(row: dict[str, Any]) -> list[str]:
    out = []
    for key, label in (
        ("solver", "solver"),
        ("whole_gpu", "whole-GPU"),
        ("first_fit", "first-fit"),
    ):
        f = row[key]
        out.append(
            f"{row['size']:>9} {label:>10} {f['placed']:>7} {f['gpus_touched']:>10} "
            f"{100 * f['stranded']:>8.1f}% {100 * f['idle_in_slices']:>8.1f}% "
            f"{100 * f['unsold']:>6.1f}% {f['seconds']:>8.1f}"
        )
    ratio = row["stranded_vs_first_fit"]
    out.append(
        f"{'':>9} placed {row['placed_vs_whole']:.2f}x whole-GPU; stranded "
        f"{'-' if ratio is None else f'{ratio:.2f}'} of first-fit's "
        f"({100 * row['fractional_jobs']:.0f} % of jobs fractional)"
    )
    return out
