"""Clear the fractional part of a market: fractional jobs into MIG slices and GPU shares.

Each way a fractional offer can sell part of a GPU (a MIG profile; k shares of
a shared GPU) becomes an *option*: a one-accelerator offer scaled to that part
(price, compute, bandwidth and power times its share; memory the slice's), so
that ``rules`` applies every market rule to it as to any offer. Which options
can be sold together is the packing problem, solved with CP-SAT:

    max  sum w_p x_p                      (pairs: job x option)
    s.t. sum_{p of job j} x_p <= 1
         MIG GPU: y[profile, start] are the instances after the round; no two
           over one memory slot, no more compute slices than the GPU has, and
           each profile's jobs <= its instances (busy slots stay as they are)
         shared offer: jobs go into its GPUs' bins, each bin <= its shares

A pair's weight is the market's (the job's value less its cost on the option),
less ``slice_idle_weight`` of the job's value per GPU of compute the option holds
beyond the job's ask: of two jobs a slice fits, the round prefers the one that
fills it (a 0.32 job strands 0.11 of a GPU in a 3g = 0.43 instance).

A first-fit-decreasing answer hints the search and is kept if CP-SAT finds
nothing better in its time. When every pair fits in the model (small rounds)
CP-SAT's bound is the round's bound; otherwise each job's best pairs are kept
(and the bound is the sum of each job's best pair), and afterwards jobs left out
go, best pair first over all their pairs, into what the answer left free.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray
from ortools.sat.python import cp_model

from solver.fractions import Gpu, demand, fits_profile, parse_instance, shares_needed
from solver.market import Assignment, Job, Market, Offer, Result
from solver.rules import Floats, Ints, MarketArrays, evaluate, evaluate_pairs, overhead_seconds

SCALE = 1e6  # integer objective units per USD
PER_JOB = 24  # pairs kept per job when the round is too big to keep them all
PER_OFFER = 96  # and pairs kept per offer
ALL_PAIRS = 20_000  # rounds with at most this many pairs keep every pair (exact)


def _asked(job: Job) -> float:
    """The part of a GPU's compute a job asks (nan: a MIG profile, which it fills)."""
    f = job.fraction if job.fraction is not None else job.min_compute
    return float("nan") if f is None else f


def _idle_cost(
    market: Market, jobs: tuple[Job, ...], block: slice, options: list[Option], value: Floats
) -> Floats:
    """What each (job, option) of ``block`` gives up for the compute its slice holds
    beyond the job's ask: ``slice_idle_weight`` of the job's value per GPU of it."""
    asked = np.array([_asked(jobs[j]) for j in range(block.start, block.stop)])
    share = np.array([o.share for o in options])
    idle = share[None, :] - np.minimum(asked[:, None], share[None, :])
    idle[np.isnan(asked)] = 0.0
    cost: Floats = market.weights.slice_idle_weight * value[:, None] * idle
    return cost


@dataclass(frozen=True, slots=True)
class Option:
    offer: int  # index into the fractional offers
    profile: str  # MIG profile, or "" for shares
    shares: int  # shared offers: shares of one GPU
    share: float  # of one GPU: what is billed


@dataclass(frozen=True)
class Packing:
    jobs: tuple[int, ...]  # indices into the fractional jobs
    options: tuple[int, ...]  # the option each takes
    slices: tuple[str, ...]  # "3g.40gb@4" or "2/8 shared on GPU 0"
    value: float
    bound: float
    optimal: bool
    repartitions: dict[int, tuple[str, ...]]  # offer index -> new full layout
    arrays: MarketArrays  # the jobs x options market the rules were applied to
    option_list: tuple[Option, ...]
    unplaceable: tuple[int, ...]


def options_of(offers: tuple[Offer, ...]) -> tuple[list[Option], list[Offer]]:
    """Every option of every fractional offer, and the scaled offer standing for each."""
    options: list[Option] = []
    scaled: list[Offer] = []
    for i, o in enumerate(offers):
        parts: list[tuple[str, int, float, float]] = []
        if o.fraction_kind == "mig":
            gpu = Gpu.of(o)
            parts = [(p.name, 0, p.share, p.memory_gib) for p in gpu.profiles.values()]
        else:
            per = o.memory_gib / o.shares
            parts = [("", k, k / o.shares, per * k) for k in range(1, o.shares + 1)]
        for name, k, share, gib in parts:
            options.append(Option(i, name, k, share))
            scaled.append(
                replace(
                    o,
                    id=f"{o.id}#{name or k}",
                    count=1,
                    memory_gib=gib,
                    tflops_bf16=o.tflops_bf16 * share,
                    tflops_fp32=o.tflops_fp32 * share,
                    mem_bw_gbps=o.mem_bw_gbps * share,
                    price_per_hour=o.price_per_hour * share,
                    power_w=o.power_w * share,
                    fraction_kind="whole",
                    mig_profiles=(),
                    mig_instances=(),
                    mig_busy=(),
                    shares=0,
                )
            )
    return options, scaled


def _fits(job: Job, offer: Offer, opt: Option, gpu: Gpu | None) -> bool:
    if gpu is not None:
        return fits_profile(job, offer, gpu.profiles[opt.profile])
    return shares_needed(job, offer) == opt.shares


def pack(market: Market, time_limit: float) -> Packing:
    """The best packing of ``market``'s fractional jobs into its fractional offers."""
    offers, jobs = market.offers, market.jobs
    options, scaled = options_of(offers)
    gpus = [Gpu.of(o) if o.fraction_kind == "mig" else None for o in offers]
    # The rules see one-accelerator jobs (fit is checked here, memory included).
    plain = tuple(replace(j, accelerators=1, min_memory_gib=0.0) for j in jobs)
    a = MarketArrays.build(Market(offers=tuple(scaled), jobs=plain, weights=market.weights))
    pj: list[int] = []
    po: list[int] = []
    pw: list[float] = []
    for block in a.blocks():
        b = evaluate(a, block)
        ok = b.feasible
        weight = a.j_value[block][:, None] - b.cost
        if market.weights.slice_idle_weight:
            weight = weight - _idle_cost(market, jobs, block, options, a.j_value[block])
        for r, j in enumerate(range(block.start, block.stop)):
            row = [
                k
                for k in np.flatnonzero(ok[r]).tolist()
                if _fits(jobs[j], offers[options[k].offer], options[k], gpus[options[k].offer])
            ]
            pj += [j] * len(row)
            po += row
            pw += weight[r, row].tolist()
    job_i, opt_i, w = np.array(pj, dtype=np.int64), np.array(po, dtype=np.int64), np.array(pw)
    every_pair = (job_i, opt_i, w)
    unplaceable = tuple(sorted(set(range(len(jobs))) - set(pj)))
    every = len(w) <= ALL_PAIRS
    if not every:
        # Each job keeps its best pairs and each offer its best jobs, so that every
        # GPU stays reachable; equal pairs (identical GPUs) break ties by a hash
        # of job and offer rather than all landing on the first few GPUs.
        offer_of = np.array([options[k].offer for k in opt_i.tolist()], dtype=np.int64)
        score = w + ((job_i * 7919 + offer_of * 104_729) % 1009) * 1e-9
        keep = _top(job_i, score, PER_JOB) | _top(offer_of, score, PER_OFFER)
        trivial = float(sum(max(0.0, w[job_i == j].max()) for j in set(pj)))
        job_i, opt_i, w = job_i[keep], opt_i[keep], w[keep]
    greedy = _first_fit(jobs, offers, options, gpus, job_i, opt_i, w)
    answer = _cp_sat(offers, options, gpus, job_i, opt_i, w, greedy, time_limit)
    if answer is None or answer[2] < greedy[2]:
        answer = greedy if answer is None else (*greedy[:3], answer[3], False, greedy[5])
    chosen, slices, value, bound, optimal, layouts = answer
    placed = [(int(job_i[p]), int(opt_i[p])) for p in chosen]
    if not every:
        # The kept pairs left some jobs out that fit what the answer left free.
        more, more_slices, gained, layouts = _fill_in(
            offers, options, gpus, placed, slices, layouts, *every_pair
        )
        placed, slices, value = placed + more, [*slices, *more_slices], value + gained
        bound, optimal = max(trivial, value), False
    repartitions = {
        i: tuple(f"{n}@{s}" for n, s in sorted(layout, key=lambda x: x[1]))
        for i, layout in layouts.items()
        if set(_existing(gpus[i])) - set(layout)
    }
    return Packing(
        jobs=tuple(j for j, _ in placed),
        options=tuple(k for _, k in placed),
        slices=tuple(slices),
        value=value,
        bound=bound,
        optimal=optimal,
        repartitions=repartitions,
        arrays=a,
        option_list=tuple(options),
        unplaceable=unplaceable,
    )


def _top(group: Ints, score: Floats, k: int) -> NDArray[np.bool_]:
    """The ``k`` highest-scoring entries of each group."""
    order = np.lexsort((-score, group))
    starts = np.flatnonzero(np.diff(group[order], prepend=-1))
    rank = np.arange(len(score)) - np.repeat(starts, np.diff(np.append(starts, len(score))))
    keep = np.zeros(len(score), dtype=bool)
    keep[order[rank < k]] = True
    return keep


Gpus = list[Gpu | None]
Layouts = dict[int, list[tuple[str, int]]]
Answer = tuple[list[int], list[str], float, float, bool, Layouts]


def _first_fit(
    jobs: tuple[Job, ...],
    offers: tuple[Offer, ...],
    options: list[Option],
    gpus: Gpus,
    job_i: Ints,
    opt_i: Ints,
    w: Floats,
) -> Answer:
    """Smallest jobs first, each into its best option that still fits (new MIG
    instances at the highest free position, which keeps position 0 for big ones)."""
    state = _State(offers, gpus)
    by_job: dict[int, list[int]] = defaultdict(list)
    for p in np.argsort(-w, kind="stable").tolist():
        by_job[int(job_i[p])].append(p)
    size = {j: demand(jobs[j], 0.0) for j in by_job}
    taken: list[int] = []
    slices: list[str] = []
    for j in sorted(by_job, key=lambda j: (-jobs[j].priority, size[j], j)):
        for p in by_job[j]:
            opt = options[int(opt_i[p])]
            label = state.take(opt)
            if label is not None:
                taken.append(p)
                slices.append(label)
                break
    layouts = {i: state.layout(i) for i in state.instances}
    value = float(sum(w[p] for p in taken))
    return taken, slices, value, float("inf"), False, layouts


def _fill_in(
    offers: tuple[Offer, ...],
    options: list[Option],
    gpus: Gpus,
    placed: list[tuple[int, int]],
    slices: list[str],
    layouts: Layouts,
    job_i: Ints,
    opt_i: Ints,
    w: Floats,
) -> tuple[list[tuple[int, int]], list[str], float, Layouts]:
    """Jobs the answer left out, each into what it left free (its best pair of all,
    not only of those the search kept), best pairs first; only pairs worth placing.
    Returns the new (job, option) pairs, their slices, their worth, and the layouts."""
    state = _State(offers, gpus)
    for i, layout in layouts.items():
        mine = {parse_instance(t) for (j, k), t in zip(placed, slices, strict=True)
                if options[k].offer == i}  # fmt: skip
        state.instances[i] = {pl: pl in mine for pl in layout}
    for (_, k), label in zip(placed, slices, strict=True):
        opt = options[k]
        if gpus[opt.offer] is None:
            state.bins[opt.offer][int(label.rsplit(" ", 1)[1])] -= opt.shares
    done = {j for j, _ in placed}
    more: list[tuple[int, int]] = []
    labels: list[str] = []
    gained = 0.0
    for p in np.argsort(-w, kind="stable").tolist():
        j, k = int(job_i[p]), int(opt_i[p])
        if j in done or w[p] <= 0:
            continue
        taken = state.take(options[k])
        if taken is not None:
            done.add(j)
            more.append((j, k))
            labels.append(taken)
            gained += float(w[p])
    return more, labels, gained, {i: state.layout(i) for i in state.instances}


def _busy(o: Offer, g: int) -> int:
    """Shares already taken on GPU ``g`` of shared offer ``o``."""
    return o.shares_busy[g] if g < len(o.shares_busy) else 0


class _State:
    """Instances and shares taken so far, for first-fit. On an idle MIG GPU a
    new instance may replace free instances nobody has taken (a re-cut)."""

    def __init__(self, offers: tuple[Offer, ...], gpus: Gpus) -> None:
        self.offers, self.gpus = offers, gpus
        # Per MIG GPU: its instances now, each with whether a job has it.
        self.instances = {
            i: {pl: False for pl in g.existing} for i, g in enumerate(gpus) if g is not None
        }
        self.bins = {
            i: [o.shares - _busy(o, g) for g in range(o.count)]
            for i, o in enumerate(offers)
            if o.fraction_kind == "shared"
        }

    def layout(self, i: int) -> list[tuple[str, int]]:
        return list(self.instances[i])

    def take(self, opt: Option) -> str | None:
        gpu = self.gpus[opt.offer]
        if gpu is None:
            bins = self.bins[opt.offer]
            for b, left in enumerate(bins):
                if left >= opt.shares:
                    bins[b] -= opt.shares
                    return f"{opt.shares}/{self.offers[opt.offer].shares} shared on GPU {b}"
            return None
        here = self.instances[opt.offer]
        for (name, start), taken in here.items():
            if name == opt.profile and not taken:
                here[(name, start)] = True
                return f"{name}@{start}"
        if gpu.fixed:
            return None  # only the instances cut now
        p = gpu.profiles[opt.profile]
        for s in sorted(p.starts, reverse=True):
            if s + p.width > gpu.slots or p.slots(s) & gpu.busy:
                continue
            clash = [pl for pl in here if gpu.profiles[pl[0]].slots(pl[1]) & p.slots(s)]
            if clash and (not gpu.idle or any(here[pl] for pl in clash)):
                continue
            kept = sum(gpu.profiles[n].compute for n, _ in here if (n, _) not in clash)
            if gpu.busy_compute + kept + p.compute > gpu.total:
                continue
            for pl in clash:
                del here[pl]
            here[(p.name, s)] = True
            return f"{p.name}@{s}"
        return None


def _cp_sat(
    offers: tuple[Offer, ...],
    options: list[Option],
    gpus: Gpus,
    job_i: Ints,
    opt_i: Ints,
    w: Floats,
    hint: Answer,
    time_limit: float,
) -> Answer | None:
    model = cp_model.CpModel()
    n = len(w)
    x = [model.new_bool_var(f"x{p}") for p in range(n)]
    weights = np.round(w * SCALE).astype(np.int64).tolist()
    objective = [weights[p] * x[p] for p in range(n)]
    by_job: dict[int, list[int]] = defaultdict(list)
    by_offer: dict[int, list[int]] = defaultdict(list)
    for p in range(n):
        by_job[int(job_i[p])].append(p)
        by_offer[options[int(opt_i[p])].offer].append(p)
    for ps in by_job.values():
        model.add_at_most_one(x[p] for p in ps)
    hinted = dict(zip(hint[0], hint[1], strict=True))
    y_of: dict[int, dict[tuple[str, int], cp_model.IntVar]] = {}
    bins_of: dict[int, dict[int, list[cp_model.IntVar]]] = {}
    for i, ps in by_offer.items():
        gpu = gpus[i]
        if gpu is None:
            # Jobs go into the offer's GPUs; each GPU holds at most its shares.
            o = offers[i]
            bins_of[i] = {}
            loads: list[list[tuple[int, cp_model.IntVar]]] = [[] for _ in range(o.count)]
            for p in ps:
                bs = [model.new_bool_var(f"b{p}_{g}") for g in range(o.count)]
                model.add(sum(bs) == x[p])
                bins_of[i][p] = bs
                for g, b in enumerate(bs):
                    loads[g].append((options[int(opt_i[p])].shares, b))
            for g, load in enumerate(loads):
                model.add(sum(k * b for k, b in load) <= o.shares - _busy(o, g))
            continue
        y = {pl: model.new_bool_var(f"y{i}_{pl[0]}_{pl[1]}") for pl in gpu.placements()}
        y_of[i] = y
        for pl, v in y.items():
            if pl in gpu.existing:
                if gpu.idle:
                    objective.append(v)  # keeping an instance breaks ties: no needless re-cuts
                else:
                    model.add(v == 1)
        for slot in range(gpu.slots):
            cover = [v for (name, s), v in y.items() if slot in gpu.profiles[name].slots(s)]
            if slot in gpu.busy:
                model.add(sum(cover) == 0)
            elif len(cover) > 1:
                model.add(sum(cover) <= 1)
        model.add(
            sum(gpu.profiles[name].compute * v for (name, _), v in y.items())
            <= gpu.total - gpu.busy_compute
        )
        per_profile: dict[str, list[int]] = defaultdict(list)
        for p in ps:
            per_profile[options[int(opt_i[p])].profile].append(p)
        for name, members in per_profile.items():
            model.add(
                sum(x[p] for p in members) <= sum(v for (nm, _), v in y.items() if nm == name)
            )
    for p in range(n):
        model.add_hint(x[p], p in hinted)
    for i, y in y_of.items():
        for pl, v in y.items():
            model.add_hint(v, pl in hint[5][i])
    for bins in bins_of.values():
        for p, bs in bins.items():
            on = int(hinted[p].rsplit(" ", 1)[1]) if p in hinted else -1
            for g, b in enumerate(bs):
                model.add_hint(b, g == on)
    model.maximize(sum(objective))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.05, time_limit)
    solver.parameters.num_workers = 1
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    chosen = [p for p in range(n) if solver.value(x[p])]
    layouts = {i: [pl for pl, v in y.items() if solver.value(v)] for i, y in y_of.items()}
    slices: list[str] = []
    instances: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i, layout in layouts.items():
        gpu = gpus[i]
        ordered = sorted(layout, key=lambda pl: (pl not in _existing(gpu), pl[1]))
        for name, start in ordered:
            instances[(i, name)].append(start)
    used: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for p in chosen:
        opt = options[int(opt_i[p])]
        if gpus[opt.offer] is None:
            g = next(k for k, b in enumerate(bins_of[opt.offer][p]) if solver.value(b))
            slices.append(f"{opt.shares}/{offers[opt.offer].shares} shared on GPU {g}")
        else:
            start = instances[(opt.offer, opt.profile)].pop(0)
            used[opt.offer].append((opt.profile, start))
            slices.append(f"{opt.profile}@{start}")
    # The layout after the round: instances kept, and new ones only where a job runs.
    final = {
        i: [pl for pl in layout if pl in _existing(gpus[i]) or pl in used[i]]
        for i, layout in layouts.items()
    }
    value = float(sum(w[p] for p in chosen))
    bound = max(value, solver.best_objective_bound / SCALE + 0.5 * len(by_job) / SCALE)
    return chosen, slices, value, bound, status == cp_model.OPTIMAL, final


def _existing(gpu: Gpu | None) -> tuple[tuple[str, int], ...]:
    return () if gpu is None else gpu.existing


def to_result(market: Market, p: Packing, started: float) -> Result:
    """The packing as a ``Result`` over ``market``'s fractional jobs and offers."""
    a = p.arrays
    ji = np.array(p.jobs, dtype=np.int64)
    oi = np.array(p.options, dtype=np.int64)
    block = evaluate_pairs(a, ji, oi)
    startup = overhead_seconds(a, ji, oi)
    assignments = tuple(
        Assignment(
            job=market.jobs[j].id,
            offer=market.offers[p.option_list[k].offer].id,
            cost=float(block.cost[n]),
            runtime_hours=float(block.runtime[n]),
            compute_usd=float(block.compute[n]),
            egress_usd=float(block.egress[n]),
            latency_usd=float(block.latency[n]),
            rtt_ms=float(block.rtt[n]),
            startup_seconds=float(startup[n]),
            energy_kwh=float(block.energy[n]),
            gco2=float(block.gco2[n]),
            carbon_usd=float(block.carbon[n]),
            slice=p.slices[n],
            share=p.option_list[k].share,
        )
        for n, (j, k) in enumerate(zip(p.jobs, p.options, strict=True))
    )
    placed = set(p.jobs)
    return Result(
        status="OPTIMAL" if p.optimal else "FEASIBLE",
        objective=p.value,
        bound=p.bound,
        solve_seconds=time.perf_counter() - started,
        assignments=assignments,
        unassigned=tuple(j.id for n, j in enumerate(market.jobs) if n not in placed),
        unplaceable=tuple(market.jobs[j].id for j in p.unplaceable),
        repartitions={market.offers[i].id: layout for i, layout in p.repartitions.items()},
    )
