"""Fractional jobs in MIG slices and GPU shares: feasibility, placements, the exact optimum.

The reference here is written independently of ``solver.packing``: it places
slices by trying every position and finds the optimum by trying every
assignment of jobs to (offer, slice), on markets small enough for that.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters import mig
from solver import Job, Market, Offer, Result, solve
from solver.fractions import parse_shares
from solver.market import MarketFileError, Weights, load_market

H100 = {p.name: p for p in mig.profiles("h100-sxm")}
SPECS = mig.specs("h100-sxm")
BASE = {
    "vendor": "nvidia",
    "accelerator": "h100-sxm",
    "platform": "cuda",
    "memory_gib": 80.0,
    "tflops_bf16": 989.0,
    "tflops_fp32": 67.0,
    "mem_bw_gbps": 3350.0,
    "region": "us-east",
    "country": "US",
    "lat": 38.9,
    "lon": -77.0,
}
VALUE = 10_000.0  # the default placement value


def mig_gpu(
    id: str, price: float = 2.0, free: tuple[str, ...] = (), busy: tuple[str, ...] = ()
) -> Offer:
    return Offer(
        id=id,
        count=1,
        price_per_hour=price,
        fraction_kind="mig",
        mig_profiles=SPECS,
        mig_instances=tuple(free),
        mig_busy=tuple(busy),
        **BASE,  # type: ignore[arg-type]
    )


def shared(id: str, count: int, shares: int, price: float = 2.0) -> Offer:
    return Offer(
        id=id,
        count=count,
        price_per_hour=price,
        fraction_kind="shared",
        shares=shares,
        **BASE,  # type: ignore[arg-type]
    )


def job(id: str, **kw: object) -> Job:
    return Job(id=id, platforms=("cuda",), max_price_per_hour=10.0, duration_hours=1.0, **kw)  # type: ignore[arg-type]


# --- the reference -------------------------------------------------------------


def needs(j: Job) -> tuple[float, float]:
    c = j.fraction if j.fraction is not None else (j.min_compute or 0.0)
    m = max(j.min_memory_gib, (j.fraction or 0.0) * 80.0)
    return c, m


def ref_options(j: Job, o: Offer) -> list[tuple[str, float]]:
    """(slice kind, share of the GPU) the job may take on offer ``o``."""
    c, m = needs(j)
    if o.fraction_kind == "mig":
        return [
            (p.name, p.compute / 7)
            for p in H100.values()
            if (j.mig_profile == p.name)
            or (j.mig_profile is None and p.compute / 7 >= c - 1e-9 and p.memory_gib >= m - 1e-9)
        ]
    if not j.accepts_shared or j.mig_profile is not None:
        return []
    k = max(1, math.ceil(c * o.shares - 1e-9), math.ceil(m / (80.0 / o.shares) - 1e-9))
    return [(str(k), k / o.shares)] if k <= o.shares else []


def slots(name: str, start: int) -> set[int]:
    return set(range(start, start + H100[name].width))


def placeable(names: list[str], blocked: set[int], compute_left: int) -> bool:
    """Whether instances of ``names`` fit in the slots not ``blocked``, trying every start."""
    if sum(H100[n].compute for n in names) > compute_left:
        return False
    if not names:
        return True
    first, rest = names[0], names[1:]
    for s in H100[first].starts:
        fits = s + H100[first].width <= 8 and not (slots(first, s) & blocked)
        if fits and placeable(rest, blocked | slots(first, s), compute_left - H100[first].compute):
            return True
    return False


def mig_fits(o: Offer, names: list[str]) -> bool:
    busy: set[int] = set()
    compute = 7
    for text in o.mig_busy:
        name, start = text.split("@")
        busy |= slots(name, int(start))
        compute -= H100[name].compute
    free = [(t.split("@")[0], int(t.split("@")[1])) for t in o.mig_instances]
    if not o.mig_busy:
        return placeable(names, busy, compute)  # idle: may be cut again
    left = list(names)
    blocked = set(busy)
    for n, s in free:
        blocked |= slots(n, s)
        compute -= H100[n].compute
        if n in left:
            left.remove(n)
    return placeable(left, blocked, compute)


def bins_fit(sizes: list[int], count: int, shares: int) -> bool:
    for combo in itertools.product(range(count), repeat=len(sizes)):
        load = [0] * count
        for b, k in zip(combo, sizes, strict=True):
            load[b] += k
        if max(load, default=0) <= shares:
            return True
    return not sizes


def brute_force(market: Market) -> float:
    offers = market.offers
    choices = [
        [None] + [(o, kind, share) for o in offers for kind, share in ref_options(j, o)]
        for j in market.jobs
    ]
    best = 0.0
    for combo in itertools.product(*choices):
        by_offer: dict[str, list[str]] = {}
        total = 0.0
        for j, c in zip(market.jobs, combo, strict=True):
            if c is None:
                continue
            o, kind, share = c
            by_offer.setdefault(o.id, []).append(kind)
            value = j.priority * VALUE
            total += value - o.price_per_hour * share * (j.duration_hours or 0)
            # The slice's compute beyond the ask costs a share of the job's value.
            asked = j.fraction if j.fraction is not None else j.min_compute
            if asked is not None:
                total -= market.weights.slice_idle_weight * value * (share - min(asked, share))
        if total <= best:
            continue
        ok = all(
            mig_fits(o, by_offer[o.id])
            if o.fraction_kind == "mig"
            else bins_fit([int(k) for k in by_offer[o.id]], o.count, o.shares)
            for o in offers
            if o.id in by_offer
        )
        if ok:
            best = total
    return best


def check(market: Market, result: Result) -> None:
    """Every placed job in a slice that fits it; no GPU over its slots, compute or shares."""
    offers = {o.id: o for o in market.offers}
    jobs = {j.id: j for j in market.jobs}
    per_gpu: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for a in result.assignments:
        o, j = offers[a.offer], jobs[a.job]
        kinds = {kind for kind, _ in ref_options(j, o)}
        if o.fraction_kind == "mig":
            name, at = a.slice.split("@")
            assert name in kinds, (a.job, a.slice)
            assert int(at) in H100[name].starts
            per_gpu.setdefault((o.id, ""), []).append((name, int(at)))
        else:
            m = re.fullmatch(r"(\d+)/(\d+) shared on GPU (\d+)", a.slice)
            assert m, a.slice
            assert m.group(1) in kinds
            assert int(m.group(2)) == o.shares
            assert int(m.group(3)) < o.count
            per_gpu.setdefault((o.id, m.group(3)), []).append(("", int(m.group(1))))
        assert a.share == pytest.approx(
            H100[a.slice.split("@")[0]].compute / 7
            if o.fraction_kind == "mig"
            else int(a.slice.split("/")[0]) / o.shares
        )
    for (offer_id, _), used in per_gpu.items():
        o = offers[offer_id]
        if o.fraction_kind == "shared":
            assert sum(k for _, k in used) <= o.shares
            continue
        assert len(set(used)) == len(used), "two jobs in one MIG instance"
        layout = [(t.split("@")[0], int(t.split("@")[1])) for t in o.mig_busy]
        if offer_id in result.repartitions:
            assert not o.mig_busy, "a busy GPU was re-partitioned"
            planned = [
                (t.split("@")[0], int(t.split("@")[1])) for t in result.repartitions[offer_id]
            ]
            assert set(used) <= set(planned)
            layout += planned
        else:
            kept = [(t.split("@")[0], int(t.split("@")[1])) for t in o.mig_instances]
            layout += kept + [u for u in used if u not in kept]
        taken: set[int] = set()
        for name, start in layout:
            assert not (slots(name, start) & taken), f"{offer_id}: {layout} overlaps"
            taken |= slots(name, start)
        assert max(taken, default=0) < 8
        assert sum(H100[n].compute for n, _ in layout) <= 7, f"{offer_id}: over 7 slices"


# --- markets -------------------------------------------------------------------

LAYOUTS = [
    ((), ()),  # idle, nothing cut yet
    (("3g.40gb@0", "3g.40gb@4"), ()),  # idle, cut in halves
    (("3g.40gb@4",), ("1g.10gb@0",)),  # one 1g busy, a 3g free, room for more
    (("1g.10gb@6",), ("4g.40gb@0",)),  # 4g busy
]
FRACTIONS = [0.1, 0.16, 0.23, 0.32, 0.47, 0.5, 0.65, 0.81, 1.0]


@st.composite
def markets(draw: st.DrawFn, max_jobs: int = 4) -> Market:
    offers: list[Offer] = []
    for i in range(draw(st.integers(1, 2))):
        if draw(st.booleans()):
            free, busy = draw(st.sampled_from(LAYOUTS))
            offers.append(mig_gpu(f"m{i}", draw(st.sampled_from([1.0, 2.0, 3.5])), free, busy))
        else:
            offers.append(
                shared(f"s{i}", draw(st.integers(1, 2)), draw(st.sampled_from([2, 4, 8])))
            )
    jobs: list[Job] = []
    for i in range(draw(st.integers(1, max_jobs))):
        kind = draw(st.sampled_from(["fraction", "profile", "compute"]))
        extra: dict[str, object] = {
            "accepts_shared": draw(st.booleans()),
            "priority": draw(st.integers(1, 2)),
        }
        if kind == "fraction":
            extra["fraction"] = draw(st.sampled_from(FRACTIONS))
        elif kind == "profile":
            extra["mig_profile"] = draw(st.sampled_from(sorted(H100)))
        else:
            extra["min_compute"] = draw(st.sampled_from([0.1, 0.3, 0.5]))
            extra["min_memory_gib"] = draw(st.sampled_from([5.0, 15.0, 30.0]))
        jobs.append(job(f"j{i}", **extra))
    idle = draw(st.sampled_from([0.0, 0.25, 1.0]))  # counting jobs only, the default, more
    return Market(offers=tuple(offers), jobs=tuple(jobs), weights=Weights(slice_idle_weight=idle))


@settings(max_examples=40, deadline=None)
@given(markets())
def test_small_markets_are_cleared_exactly(market: Market) -> None:
    result = solve(market, time_limit=5.0)
    check(market, result)
    best = brute_force(market)
    assert result.objective == pytest.approx(best, abs=1e-3)
    assert result.bound is not None
    assert result.bound >= best - 1e-3


@settings(max_examples=15, deadline=None)
@given(markets(max_jobs=12))
def test_bigger_markets_never_overfill_a_gpu(market: Market) -> None:
    result = solve(market, time_limit=5.0)
    check(market, result)
    assert result.bound is not None
    assert result.objective <= result.bound + 1e-6


def test_slices_start_only_where_the_profile_may() -> None:
    # Two 3g.40gb fill an idle H100 at positions 0 and 4; a third does not fit.
    market = Market(
        offers=(mig_gpu("g"),), jobs=tuple(job(f"j{i}", mig_profile="3g.40gb") for i in range(3))
    )
    result = solve(market, time_limit=5.0)
    assert sorted(a.slice for a in result.assignments) == ["3g.40gb@0", "3g.40gb@4"]
    assert len(result.unassigned) == 1


def test_a_4g_and_a_3g_share_a_gpu_but_two_4g_do_not() -> None:
    jobs = (
        job("a", mig_profile="4g.40gb"),
        job("b", mig_profile="4g.40gb"),
        job("c", fraction=0.4),
    )
    result = solve(Market(offers=(mig_gpu("g"),), jobs=jobs), time_limit=5.0)
    assert {a.slice for a in result.assignments} == {"4g.40gb@0", "3g.40gb@4"}


def test_an_idle_gpu_is_cut_again_when_that_sells_more() -> None:
    # Cut in two 3g halves, idle: seven 1g jobs sell more than the halves.
    offer = mig_gpu("g", free=("3g.40gb@0", "3g.40gb@4"))
    jobs = tuple(job(f"j{i}", mig_profile="1g.10gb") for i in range(7))
    result = solve(Market(offers=(offer,), jobs=jobs), time_limit=5.0)
    assert len(result.assignments) == 7
    assert result.repartitions == {"g": tuple(f"1g.10gb@{s}" for s in range(7))}


def test_a_busy_gpu_keeps_its_instances() -> None:
    # 1g busy at 0, a free 3g at 4: the 3g is sold as it is, the slots 1-3 take new ones.
    offer = mig_gpu("g", free=("3g.40gb@4",), busy=("1g.10gb@0",))
    small = [job(f"j{i}", mig_profile="1g.10gb") for i in range(5)]
    jobs = (*small, job("big", mig_profile="3g.40gb"))
    result = solve(Market(offers=(offer,), jobs=jobs), time_limit=5.0)
    assert result.repartitions == {}
    slices = sorted(a.slice for a in result.assignments)
    assert slices == ["1g.10gb@1", "1g.10gb@2", "1g.10gb@3", "3g.40gb@4"]


def test_shared_capacity_only_for_jobs_that_accept_it() -> None:
    offer = shared("s", count=1, shares=4)
    jobs = (job("no", fraction=0.25), job("yes", fraction=0.25, accepts_shared=True))
    result = solve(Market(offers=(offer,), jobs=jobs), time_limit=5.0)
    assert [(a.job, a.slice) for a in result.assignments] == [("yes", "1/4 shared on GPU 0")]
    assert result.assignments[0].compute_usd == pytest.approx(2.0 * 0.25)
    assert result.unplaceable == ("no",)


def test_shares_already_taken_are_not_sold_again() -> None:
    """GPU 0 has 3 of its 4 shares taken: a half goes to GPU 1, a quarter may fill GPU 0,
    and a third half finds no room."""
    offer = dataclasses.replace(shared("s", count=2, shares=4), shares_busy=(3, 0))
    jobs = tuple(
        job(i, fraction=f, accepts_shared=True)
        for i, f in (("half", 0.5), ("quarter", 0.25), ("half2", 0.5), ("half3", 0.5))
    )
    result = solve(Market(offers=(offer,), jobs=jobs), time_limit=5.0)
    load = {0: 3, 1: 0}
    for a in result.assignments:
        m = re.fullmatch(r"(\d+)/4 shared on GPU (\d+)", a.slice)
        assert m is not None
        load[int(m.group(2))] += int(m.group(1))
    assert load == {0: 4, 1: 4}, result.assignments
    assert len(result.assignments) == 3


def test_a_gpu_sold_as_cut_is_never_cut_again() -> None:
    # As in the re-cut test, but the GPU's agent does not cut: the halves are sold.
    offer = dataclasses.replace(mig_gpu("g", free=("3g.40gb@0", "3g.40gb@4")), mig_fixed=True)
    jobs = (
        *(job(f"j{i}", mig_profile="1g.10gb") for i in range(7)),
        job("half", mig_profile="3g.40gb"),
    )
    result = solve(Market(offers=(offer,), jobs=jobs), time_limit=5.0)
    assert result.repartitions == {}
    assert [(a.job, a.slice) for a in result.assignments] == [("half", "3g.40gb@0")] or [
        (a.job, a.slice) for a in result.assignments
    ] == [("half", "3g.40gb@4")]


def test_a_slice_goes_to_the_job_that_fills_it() -> None:
    # One 1g instance (1/7 of the GPU), two jobs that fit it: the one asking 0.05 is
    # cheaper (shorter), the one asking 0.12 strands less of the slice.
    offer = dataclasses.replace(mig_gpu("g", free=("1g.10gb@0",)), mig_fixed=True)
    small = dataclasses.replace(job("small", fraction=0.05), duration_hours=1.0)
    full = dataclasses.replace(job("full", fraction=0.12), duration_hours=2.0)
    for idle, winner in ((0.0, "small"), (0.25, "full")):
        market = Market(
            offers=(offer,), jobs=(small, full), weights=Weights(slice_idle_weight=idle)
        )
        (placed,) = solve(market, time_limit=5.0).assignments
        assert placed.job == winner


def test_a_whole_job_takes_all_shares_of_a_free_gpu_only() -> None:
    # GPU 0 has a share taken; GPU 1 is free: one whole job gets it, the second waits,
    # and a gang of two never spans shared GPUs.
    offer = dataclasses.replace(shared("s", count=2, shares=4), shares_busy=(1, 0))
    jobs = (job("a"), job("b"), job("gang", accelerators=2))
    result = solve(Market(offers=(offer,), jobs=jobs), time_limit=5.0)
    (placed,) = result.assignments
    assert (placed.offer, placed.slice) == ("s", "4/4 shared on GPU 1")
    assert placed.compute_usd == pytest.approx(2.0)  # the whole price
    # A fraction placed on the free GPU in the same round keeps the whole job off it.
    for busy in ((1, 0), (4, 0)):
        offer = dataclasses.replace(shared("s", count=2, shares=4), shares_busy=busy)
        quarter = job("q", fraction=0.25, accepts_shared=True)
        result = solve(Market(offers=(offer,), jobs=(job("a"), quarter)), time_limit=5.0)
        slices = {a.job: a.slice for a in result.assignments}
        assert slices.get("q") is not None
        assert slices.get("a") != slices["q"].replace("1/4", "4/4")
        if busy == (4, 0):  # GPU 0 is full: the quarter takes GPU 1, the whole job waits
            assert slices == {"q": "1/4 shared on GPU 1"}


def test_whole_jobs_and_fractions_clear_together() -> None:
    whole = Offer(id="w", count=1, price_per_hour=2.0, **BASE)  # type: ignore[arg-type]
    jobs = (job("whole"), job("half", fraction=0.5))
    result = solve(Market(offers=(whole, mig_gpu("g")), jobs=jobs), time_limit=5.0)
    placed = {a.job: (a.offer, a.slice) for a in result.assignments}
    assert placed == {"whole": ("w", ""), "half": ("g", "4g.40gb@0")}


def test_the_market_file_checks_fraction_fields() -> None:
    offer = {k: v for k, v in BASE.items()} | {"id": "g", "count": 2, "price_per_hour": 1.0}
    with pytest.raises(MarketFileError, match="one GPU"):
        load_market({"offers": [offer | {"fraction_kind": "mig", "mig_profiles": list(SPECS)}]})
    with pytest.raises(MarketFileError, match="unknown MIG profile"):
        load_market(
            {
                "offers": [
                    offer
                    | {"count": 1, "fraction_kind": "mig", "mig_profiles": list(SPECS)}
                    | {"mig_instances": ["5g.50gb@0"]}
                ]
            }
        )
    with pytest.raises(MarketFileError, match="fraction: must be in"):
        load_market(
            {"jobs": [{"id": "j", "platforms": ["cuda"], "max_price_per_hour": 1, "fraction": 1.5}]}
        )


def test_shares_read_back_from_their_slice() -> None:
    assert parse_shares("2/8 shared on GPU 1") == (2, 8, 1)
    for bad in ("", "2/8 shared on GPU", "a/8 shared on GPU 1", "2/8 whole on GPU 1", "2 shared"):
        with pytest.raises(ValueError, match="K/N shared on GPU G"):
            parse_shares(bad)
