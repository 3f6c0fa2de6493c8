"""The market rules as numpy arrays: feasibility, runtime, latency, egress, cost.

``MarketArrays`` turns offers and jobs into columns once; ``evaluate`` then
applies every rule to a block of jobs against all offers at once. The same code
serves clearing (which pairs may match, at what cost) and explanation (which
rule ruled out how many offers).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from solver.market import Job, Market, Offer, Weights

EARTH_RADIUS_KM = 6371.0
KM_PER_MS_ROUND_TRIP = 100.0  # light in fibre, there and back

# The rules in the order they are reported; "value" is the objective's own
# rule: a match that costs more than priority x placement value is never made.
RULES = (
    "capacity",
    "memory",
    "vendor",
    "platform",
    "residency",
    "price",
    "deadline",
    "latency",
    "value",
)

Bools = NDArray[np.bool_]
Floats = NDArray[np.float64]
Ints = NDArray[np.int64]


def _codes(values: Sequence[str], vocabulary: dict[str, int]) -> Ints:
    return np.array([vocabulary.get(v, -1) for v in values], dtype=np.int64)


def _allow(lists: Sequence[tuple[str, ...]], vocabulary: dict[str, int]) -> Bools:
    """Row j: which codes job j allows (all of them when its list is empty).

    One extra column at the end stands for values no offer has.
    """
    allowed = np.zeros((len(lists), len(vocabulary) + 1), dtype=np.bool_)
    for j, values in enumerate(lists):
        if not values:
            allowed[j, :] = True
        else:
            for v in values:
                code = vocabulary.get(v)
                if code is not None:
                    allowed[j, code] = True
    return allowed


def _vocabulary(values: Sequence[str]) -> dict[str, int]:
    return {v: i for i, v in enumerate(sorted(set(values)))}


def _opt(values: Sequence[float | None], missing: float) -> Floats:
    return np.array([missing if v is None else v for v in values], dtype=np.float64)


def to_micros(usd: float) -> int:
    return round(usd * 1_000_000)


@dataclass(frozen=True)
class MarketArrays:
    """Offers and jobs as columns; built once per market."""

    offers: tuple[Offer, ...]
    jobs: tuple[Job, ...]
    weights: Weights
    # offers
    o_count: Ints
    o_memory: Floats
    o_tflops_bf16: Floats
    o_tflops_fp32: Floats
    o_bandwidth: Floats
    o_price: Floats
    o_price_micros: Ints
    o_lat: Floats  # radians
    o_lon: Floats
    o_available: Floats  # inf when unlimited
    o_efficiency: Floats
    o_vendor: Ints
    o_model: Ints
    o_platform: Ints
    o_country: Ints
    o_region: Ints
    # jobs
    j_accelerators: Ints
    j_memory: Floats
    j_price_micros: Ints
    j_duration: Floats  # nan when the roofline applies
    j_flops: Floats
    j_bytes: Floats
    j_fp32: Bools
    j_deadline: Floats  # inf when none
    j_slo: Floats  # inf when none
    j_has_user: Bools
    j_lat: Floats
    j_lon: Floats
    j_data_region: Ints  # -1 when none
    j_data_gb: Floats
    j_value: Floats  # priority x placement value
    j_vendor_ok: Bools
    j_model_ok: Bools
    j_platform_ok: Bools
    j_country_ok: Bools

    @classmethod
    def build(cls, market: Market) -> MarketArrays:
        offers, jobs, w = market.offers, market.jobs, market.weights
        vendors = _vocabulary([o.vendor for o in offers])
        models = _vocabulary([o.accelerator for o in offers])
        platforms = _vocabulary([o.platform for o in offers])
        countries = _vocabulary([o.country for o in offers])
        regions = _vocabulary([o.region for o in offers])
        no_user = np.array([j.user_lat is None or j.user_lon is None for j in jobs], dtype=bool)
        return cls(
            offers=offers,
            jobs=jobs,
            weights=w,
            o_count=np.array([o.count for o in offers], dtype=np.int64),
            o_memory=np.array([o.memory_gib for o in offers], dtype=np.float64),
            o_tflops_bf16=np.array([o.tflops_bf16 for o in offers], dtype=np.float64),
            o_tflops_fp32=np.array([o.tflops_fp32 for o in offers], dtype=np.float64),
            o_bandwidth=np.array([o.mem_bw_gbps for o in offers], dtype=np.float64),
            o_price=np.array([o.price_per_hour for o in offers], dtype=np.float64),
            o_price_micros=np.array([to_micros(o.price_per_hour) for o in offers], dtype=np.int64),
            o_lat=np.radians(np.array([o.lat for o in offers], dtype=np.float64)),
            o_lon=np.radians(np.array([o.lon for o in offers], dtype=np.float64)),
            o_available=_opt([o.available_hours for o in offers], np.inf),
            o_efficiency=np.array([o.efficiency for o in offers], dtype=np.float64),
            o_vendor=_codes([o.vendor for o in offers], vendors),
            o_model=_codes([o.accelerator for o in offers], models),
            o_platform=_codes([o.platform for o in offers], platforms),
            o_country=_codes([o.country for o in offers], countries),
            o_region=_codes([o.region for o in offers], regions),
            j_accelerators=np.array([j.accelerators for j in jobs], dtype=np.int64),
            j_memory=np.array([j.min_memory_gib for j in jobs], dtype=np.float64),
            j_price_micros=np.array(
                [to_micros(j.max_price_per_hour) for j in jobs], dtype=np.int64
            ),
            j_duration=_opt([j.duration_hours for j in jobs], np.nan),
            j_flops=_opt([j.flops for j in jobs], 0.0),
            j_bytes=_opt([j.bytes for j in jobs], 0.0),
            j_fp32=np.array([j.dtype == "fp32" for j in jobs], dtype=bool),
            j_deadline=_opt([j.deadline_hours for j in jobs], np.inf),
            j_slo=_opt([j.latency_slo_ms for j in jobs], np.inf),
            j_has_user=~no_user,
            j_lat=np.radians(np.where(no_user, 0.0, _opt([j.user_lat for j in jobs], 0.0))),
            j_lon=np.radians(np.where(no_user, 0.0, _opt([j.user_lon for j in jobs], 0.0))),
            j_data_region=np.array(
                [regions.get(j.data_region, len(regions)) if j.data_region else -1 for j in jobs],
                dtype=np.int64,
            ),
            j_data_gb=_opt([j.data_gb for j in jobs], 0.0),
            j_value=np.array([j.priority for j in jobs], dtype=np.float64) * w.placement_value_usd,
            j_vendor_ok=_allow([j.vendors for j in jobs], vendors),
            j_model_ok=_allow([j.accelerator_models for j in jobs], models),
            j_platform_ok=_allow([j.platforms for j in jobs], platforms),
            j_country_ok=_allow([j.allowed_countries for j in jobs], countries),
        )

    @property
    def n_jobs(self) -> int:
        return len(self.jobs)

    @property
    def n_offers(self) -> int:
        return len(self.offers)

    def blocks(self, pairs_per_block: int = 2_000_000) -> Iterator[slice]:
        """Slices of jobs small enough that a block x all offers fits in memory."""
        step = max(1, pairs_per_block // max(1, self.n_offers))
        for start in range(0, self.n_jobs, step):
            yield slice(start, min(start + step, self.n_jobs))


@dataclass(frozen=True)
class Block:
    """Every rule and every derived quantity for a block of jobs x all offers."""

    rules: dict[str, Bools]
    runtime: Floats
    rtt: Floats
    compute: Floats
    egress: Floats
    latency: Floats

    @property
    def cost(self) -> Floats:
        return self.compute + self.egress + self.latency

    @property
    def feasible(self) -> Bools:
        result = self.rules[RULES[0]].copy()
        for name in RULES[1:]:
            result &= self.rules[name]
        return result


def evaluate(a: MarketArrays, js: slice | Ints, counts: Ints | None = None) -> Block:
    """Apply the market rules to jobs ``js`` against every offer (a jobs x offers block).

    ``counts`` overrides the offers' free accelerators (capacity left in a round).
    """
    jobs = np.arange(a.n_jobs)[js] if isinstance(js, slice) else js
    return evaluate_pairs(a, jobs[:, None], np.arange(a.n_offers)[None, :], counts)


def evaluate_pairs(a: MarketArrays, ji: Ints, oi: Ints, counts: Ints | None = None) -> Block:
    """Apply the market rules to job indices ``ji`` and offer indices ``oi``.

    The two broadcast: a column of jobs against a row of offers gives a block;
    two equal-length vectors give one value per pair.
    """
    w = a.weights
    acc = a.j_accelerators[ji]
    count = (a.o_count if counts is None else counts)[oi]

    runtime = _runtime(a, ji, oi)
    rtt = _rtt(a, ji, oi)
    compute = a.o_price[oi] * acc * runtime
    data_region = a.j_data_region[ji]
    elsewhere = (data_region >= 0) & (data_region != a.o_region[oi])
    egress = np.where(elsewhere, a.j_data_gb[ji] * w.egress_usd_per_gb, 0.0)
    latency = w.latency_usd_per_ms * rtt
    cost = compute + egress + latency

    rules = {
        "capacity": count >= acc,
        "memory": a.o_memory[oi] >= a.j_memory[ji],
        "vendor": a.j_vendor_ok[ji, a.o_vendor[oi]] & a.j_model_ok[ji, a.o_model[oi]],
        "platform": a.j_platform_ok[ji, a.o_platform[oi]],
        "residency": a.j_country_ok[ji, a.o_country[oi]],
        "price": a.o_price_micros[oi] <= a.j_price_micros[ji],
        "deadline": (runtime <= a.j_deadline[ji]) & (runtime <= a.o_available[oi]),
        "latency": rtt <= a.j_slo[ji],
        "value": cost < a.j_value[ji],
    }
    return Block(rules, runtime, rtt, compute, egress, latency)


def _runtime(a: MarketArrays, ji: Ints, oi: Ints) -> Floats:
    """Hours: the stated duration, or the roofline over the offer's peak figures."""
    acc = a.j_accelerators[ji].astype(np.float64)
    eff = a.o_efficiency[oi]
    tflops = np.where(a.j_fp32[ji], a.o_tflops_fp32[oi], a.o_tflops_bf16[oi])
    with np.errstate(divide="ignore", invalid="ignore"):
        compute_s = a.j_flops[ji] / (acc * tflops * 1e12 * eff)
        memory_s = a.j_bytes[ji] / (acc * a.o_bandwidth[oi] * 1e9 * eff)
    roofline = np.nan_to_num(np.maximum(compute_s, memory_s), nan=np.inf) / 3600.0
    duration = a.j_duration[ji]
    return np.where(np.isnan(duration), roofline, duration)


def _rtt(a: MarketArrays, ji: Ints, oi: Ints) -> Floats:
    """Round-trip milliseconds from the job's users to each node (0 without users)."""
    lat1, lon1 = a.j_lat[ji], a.j_lon[ji]
    lat2, lon2 = a.o_lat[oi], a.o_lon[oi]
    h = (
        np.sin((lat2 - lat1) / 2) ** 2
        + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    )
    km = 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))
    return np.where(a.j_has_user[ji], km / KM_PER_MS_ROUND_TRIP, 0.0)


def explain(job: Job, offers: Sequence[Offer], weights: Weights | None = None) -> dict[str, int]:
    """For one job: how many offers each rule rules out, and how many pass them all.

    An offer that fails several rules is counted under each; ``feasible`` is the
    number of offers that pass every rule.
    """
    market = Market(offers=tuple(offers), jobs=(job,), weights=weights or Weights())
    a = MarketArrays.build(market)
    block = evaluate(a, slice(0, 1))
    out = {name: int((~mask[0]).sum()) for name, mask in block.rules.items()}
    out["feasible"] = int(block.feasible[0].sum())
    return out
