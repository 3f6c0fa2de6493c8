"""The market rules written out again, plainly, one pair at a time.

An independent check on the vectorised rules in ``solver.rules``: tests compare
the two, and brute-force optima are computed from this one.
"""

from __future__ import annotations

import itertools
import math

from solver.market import Job, Market, Offer, Weights


def runtime_hours(j: Job, o: Offer) -> float:
    if j.duration_hours is not None:
        return j.duration_hours
    peak = (o.tflops_fp32 if j.dtype == "fp32" else o.tflops_bf16) * 1e12
    compute = (j.flops or 0.0) / (j.accelerators * peak * o.efficiency) if j.flops else 0.0
    memory = (
        (j.bytes or 0.0) / (j.accelerators * o.mem_bw_gbps * 1e9 * o.efficiency) if j.bytes else 0.0
    )
    fixed = o.startup_seconds + j.io_gb * o.transfer_s_per_gb + j.program_kb * o.compile_s_per_kb
    return (max(compute, memory) + fixed) / 3600


def rtt_ms(j: Job, o: Offer) -> float:
    if j.user_lat is None or j.user_lon is None:
        return 0.0
    p1, p2 = math.radians(j.user_lat), math.radians(o.lat)
    dp, dl = p2 - p1, math.radians(o.lon - j.user_lon)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371 * math.asin(math.sqrt(min(1.0, h))) / 100


def energy_kwh(j: Job, o: Offer) -> float:
    return o.power_w * o.pue / 1000 * j.accelerators * runtime_hours(j, o)


def gco2(j: Job, o: Offer) -> float:
    return energy_kwh(j, o) * o.grid_g_per_kwh


def carbon_usd(j: Job, o: Offer, w: Weights) -> float:
    price = w.carbon_usd_per_t if j.carbon_usd_per_t is None else j.carbon_usd_per_t
    return gco2(j, o) * price / 1e6


def cost(j: Job, o: Offer, w: Weights) -> float:
    egress = (
        (j.data_gb or 0.0) * w.egress_usd_per_gb if j.data_region not in (None, o.region) else 0.0
    )
    return (
        o.price_per_hour * j.accelerators * runtime_hours(j, o)
        + egress
        + w.latency_usd_per_ms * rtt_ms(j, o)
        + carbon_usd(j, o, w)
    )


def feasible(j: Job, o: Offer, w: Weights, count: int | None = None) -> bool:
    t = runtime_hours(j, o)
    return (
        (o.count if count is None else count) >= j.accelerators
        and o.memory_gib >= j.min_memory_gib
        and (not j.vendors or o.vendor in j.vendors)
        and (not j.accelerator_models or o.accelerator in j.accelerator_models)
        and o.platform in j.platforms
        and (not j.allowed_countries or o.country in j.allowed_countries)
        and round(o.price_per_hour * 1e6) <= round(j.max_price_per_hour * 1e6)
        and (j.deadline_hours is None or t <= j.deadline_hours)
        and (o.available_hours is None or t <= o.available_hours)
        and (j.latency_slo_ms is None or rtt_ms(j, o) <= j.latency_slo_ms)
        and (j.max_gco2 is None or gco2(j, o) <= j.max_gco2)
        and cost(j, o, w) < j.priority * w.placement_value_usd
    )


def value(j: Job, o: Offer, w: Weights) -> float:
    return j.priority * w.placement_value_usd - cost(j, o, w)


def objective(market: Market, pairs: dict[str, str]) -> float:
    jobs = {j.id: j for j in market.jobs}
    offers = {o.id: o for o in market.offers}
    return sum(value(jobs[j], offers[o], market.weights) for j, o in pairs.items())


def check_answer(market: Market, pairs: dict[str, str]) -> None:
    """Every pair feasible, no job twice, no offer oversold."""
    jobs = {j.id: j for j in market.jobs}
    offers = {o.id: o for o in market.offers}
    used: dict[str, int] = {}
    for job_id, offer_id in pairs.items():
        job, offer = jobs[job_id], offers[offer_id]
        assert feasible(job, offer, market.weights), (job_id, offer_id)
        used[offer_id] = used.get(offer_id, 0) + job.accelerators
    for offer_id, n in used.items():
        assert n <= offers[offer_id].count, f"offer {offer_id} oversold: {n}"


def brute_force(market: Market) -> float:
    """The exact optimum, by trying every assignment (small markets only)."""
    w = market.weights
    choices = [[None, *[o for o in market.offers if feasible(j, o, w)]] for j in market.jobs]
    best = 0.0
    for combo in itertools.product(*choices):
        used: dict[str, int] = {}
        total = 0.0
        ok = True
        for j, o in zip(market.jobs, combo, strict=True):
            if o is None:
                continue
            used[o.id] = used.get(o.id, 0) + j.accelerators
            if used[o.id] > o.count:
                ok = False
                break
            total += value(j, o, w)
        if ok:
            best = max(best, total)
    return best
