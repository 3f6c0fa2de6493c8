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
    "budget",
    "deadline",
    "latency",
    "carbon",
    "placement",
    "value",
)

Bools = NDArray[np.bool_]
Floats = NDArray[np.float64]
Ints = NDArray[np.int64]


def _codes(values: Sequence[str], vocabulary: dict[str, int]) -> Ints:
    return np.array([vocabulary.get(v, -1) for v in values], dtype=np.int64)


def _allow(
    lists: Sequence[tuple[str, ...]], vocabulary: dict[str, int], empty_is_any: bool = True
) -> Bools:
    """Row j: which codes job j allows (an empty list allows all, if ``empty_is_any``).

    One extra column at the end stands for values no offer has.
    """
    allowed = np.zeros((len(lists), len(vocabulary) + 1), dtype=np.bool_)
    for j, values in enumerate(lists):
        if not values and empty_is_any:
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
    o_xyz: Floats  # points on the unit sphere, one row per offer
    o_available: Floats  # inf when unlimited
    o_efficiency: Floats
    o_startup: Floats  # seconds
    o_transfer: Floats  # seconds per GB moved in or out
    o_compile: Floats  # seconds per KB of program
    o_kw: Floats  # kW drawn per accelerator at the wall: power x PUE / 1000
    o_grid: Floats  # g CO2e per kWh
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
    j_io: Floats  # GB in and out
    j_program: Floats  # KB of program
    j_fp32: Bools
    j_deadline: Floats  # inf when none
    j_budget: Floats  # USD, fee included; inf when none
    j_slo: Floats  # inf when none
    j_has_user: Bools
    j_xyz: Floats
    j_data_region: Ints  # -1 when none
    j_data_gb: Floats
    j_value: Floats  # priority x placement value
    j_max_gco2: Floats  # inf when none
    j_carbon_usd_per_g: Floats  # its carbon price, or the market's, per gram
    j_vendor_ok: Bools
    j_model_ok: Bools
    j_platform_ok: Bools
    j_country_ok: Bools
    j_pin: Ints  # the one offer a job may take (a service's replica): -1 any, n_offers none

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
            o_xyz=_unit_vectors(
                np.radians(np.array([o.lat for o in offers], dtype=np.float64)),
                np.radians(np.array([o.lon for o in offers], dtype=np.float64)),
            ).reshape(len(offers), 3),
            o_available=_opt([o.available_hours for o in offers], np.inf),
            o_efficiency=np.array([o.efficiency for o in offers], dtype=np.float64),
            o_startup=np.array([o.startup_seconds for o in offers], dtype=np.float64),
            o_transfer=np.array([o.transfer_s_per_gb for o in offers], dtype=np.float64),
            o_compile=np.array([o.compile_s_per_kb for o in offers], dtype=np.float64),
            o_kw=np.array([o.power_w * o.pue / 1000 for o in offers], dtype=np.float64),
            o_grid=np.array([o.grid_g_per_kwh for o in offers], dtype=np.float64),
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
            j_io=np.array([j.io_gb for j in jobs], dtype=np.float64),
            j_program=np.array([j.program_kb for j in jobs], dtype=np.float64),
            j_fp32=np.array([j.dtype == "fp32" for j in jobs], dtype=bool),
            j_deadline=_opt([j.deadline_hours for j in jobs], np.inf),
            j_budget=_opt([j.budget_usd for j in jobs], np.inf),
            j_slo=_opt([j.latency_slo_ms for j in jobs], np.inf),
            j_has_user=~no_user,
            j_xyz=_unit_vectors(
                np.radians(np.where(no_user, 0.0, _opt([j.user_lat for j in jobs], 0.0))),
                np.radians(np.where(no_user, 0.0, _opt([j.user_lon for j in jobs], 0.0))),
            ).reshape(len(jobs), 3),
            j_data_region=np.array(
                [regions.get(j.data_region, len(regions)) if j.data_region else -1 for j in jobs],
                dtype=np.int64,
            ),
            j_data_gb=_opt([j.data_gb for j in jobs], 0.0),
            j_value=np.array([j.priority for j in jobs], dtype=np.float64) * w.placement_value_usd,
            j_max_gco2=_opt([j.max_gco2 for j in jobs], np.inf),
            j_carbon_usd_per_g=_opt([j.carbon_usd_per_t for j in jobs], w.carbon_usd_per_t) / 1e6,
            j_vendor_ok=_allow([j.vendors for j in jobs], vendors),
            j_model_ok=_allow([j.accelerator_models for j in jobs], models),
            # Platforms are what the program was built for: none means none.
            j_platform_ok=_allow([j.platforms for j in jobs], platforms, empty_is_any=False),
            j_country_ok=_allow([j.allowed_countries for j in jobs], countries),
            j_pin=_pins(jobs, offers),
        )

    @property
    def carbon_matters(self) -> bool:
        """Whether any job's carbon price or cap can change which pairs win."""
        return bool((self.j_carbon_usd_per_g > 0).any() or np.isfinite(self.j_max_gco2).any())

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
    energy: Floats  # kWh
    gco2: Floats
    carbon: Floats  # USD, at the job's carbon price

    @property
    def cost(self) -> Floats:
        return self.compute + self.egress + self.latency + self.carbon

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
    egress = np.zeros(_shape(ji, oi))
    data = (
        (a.j_data_region[ji] >= 0).reshape(-1) if ji.ndim == 1 else a.j_data_region[ji[:, 0]] >= 0
    )
    if data.any():
        dj, do = _rows(ji, oi, data)
        elsewhere = a.j_data_region[dj] != a.o_region[do]
        egress[data] = np.where(elsewhere, a.j_data_gb[dj] * w.egress_usd_per_gb, 0.0)
    latency = w.latency_usd_per_ms * rtt
    # Energy and carbon: kWh = kW per accelerator (PUE included) x accelerators x hours.
    # A block of the scan needs them only where a price or a cap makes them matter.
    if ji.ndim == 2 and not a.carbon_matters:
        energy = gco2 = carbon = np.zeros(_shape(ji, oi))
    else:
        energy = a.o_kw[oi] * acc * runtime
        gco2 = energy * a.o_grid[oi]
        carbon = gco2 * a.j_carbon_usd_per_g[ji]
    cost = compute + egress + latency + carbon

    rules = {
        "capacity": count >= acc,
        "memory": a.o_memory[oi] >= a.j_memory[ji],
        "vendor": _allowed(a.j_vendor_ok, a.o_vendor, ji, oi)
        & _allowed(a.j_model_ok, a.o_model, ji, oi),
        "platform": _allowed(a.j_platform_ok, a.o_platform, ji, oi),
        "residency": _allowed(a.j_country_ok, a.o_country, ji, oi),
        "price": a.o_price_micros[oi] <= a.j_price_micros[ji],
        # What the developer would pay, fee included; the broker checks it again
        # exactly before it writes the match.
        "budget": compute * (1 + w.fee_rate) <= a.j_budget[ji],
        "deadline": (runtime <= a.j_deadline[ji]) & (runtime <= a.o_available[oi]),
        "latency": rtt <= a.j_slo[ji],
        "carbon": gco2 <= a.j_max_gco2[ji],
        "placement": (a.j_pin[ji] < 0) | (a.j_pin[ji] == oi),
        "value": cost < a.j_value[ji],
    }
    return Block(rules, runtime, rtt, compute, egress, latency, energy, gco2, carbon)


def _pins(jobs: Sequence[Job], offers: Sequence[Offer]) -> Ints:
    """Each job's ``offer_id`` as an offer index: -1 for none, ``len(offers)`` for an
    offer not in the market (so that no offer matches)."""
    index = {o.id: k for k, o in enumerate(offers)}
    return np.array(
        [-1 if j.offer_id is None else index.get(j.offer_id, len(offers)) for j in jobs],
        dtype=np.int64,
    )


def _allowed(table: Bools, codes: Ints, ji: Ints, oi: Ints) -> Bools:
    """``table[job, code of offer]`` for each pair: may this job use this offer's value?"""
    if ji.ndim == 2:  # a block; np.take is much faster than a 2-D gather
        taken: Bools = np.take(table[ji[:, 0]], codes[oi[0]], axis=1)
        return taken
    return table[ji, codes[oi]]


def _rows(ji: Ints, oi: Ints, mask: Bools) -> tuple[Ints, Ints]:
    """The pairs of a (ji, oi) broadcast whose job is in ``mask`` (one flag per row)."""
    if ji.ndim == 2:  # a block: a column of jobs against a row of offers
        return ji[mask], oi
    return ji[mask], oi[mask]


def _shape(ji: Ints, oi: Ints) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(ji.shape, oi.shape))


def _runtime(a: MarketArrays, ji: Ints, oi: Ints) -> Floats:
    """Hours: the stated duration, or the offer's start-up plus the roofline over its
    peak figures."""
    duration = a.j_duration[ji]
    runtime = np.broadcast_to(duration, _shape(ji, oi)).copy()
    roof = np.isnan(duration).reshape(-1) if ji.ndim == 1 else np.isnan(duration[:, 0])
    if roof.any():
        rj, ro = _rows(ji, oi, roof)
        acc = a.j_accelerators[rj].astype(np.float64)
        eff = a.o_efficiency[ro]
        tflops = np.where(a.j_fp32[rj], a.o_tflops_fp32[ro], a.o_tflops_bf16[ro])
        with np.errstate(divide="ignore", invalid="ignore"):
            compute_s = a.j_flops[rj] / (acc * tflops * 1e12 * eff)
            memory_s = a.j_bytes[rj] / (acc * a.o_bandwidth[ro] * 1e9 * eff)
        work_s = np.nan_to_num(np.maximum(compute_s, memory_s), nan=np.inf)
        fixed = a.o_startup[ro] + a.j_io[rj] * a.o_transfer[ro] + a.j_program[rj] * a.o_compile[ro]
        runtime[roof] = (work_s + fixed) / 3600.0
    return runtime


def overhead_seconds(a: MarketArrays, ji: Ints, oi: Ints) -> Floats:
    """Of each pair's runtime, the seconds every run pays besides its work: the offer's
    start-up, compiling the program, and moving its inputs in and results out (0 for
    jobs that state their duration)."""
    io = a.j_io[ji] * a.o_transfer[oi] + a.j_program[ji] * a.o_compile[oi]
    return np.where(np.isnan(a.j_duration[ji]), a.o_startup[oi] + io, 0.0)


def _rtt(a: MarketArrays, ji: Ints, oi: Ints) -> Floats:
    """Round-trip milliseconds from the job's users to each node (0 without users).

    Great-circle distance from the chord between the two points on the unit
    sphere (the same as the haversine formula, and cheaper).
    """
    rtt = np.zeros(_shape(ji, oi))
    users = a.j_has_user[ji].reshape(-1) if ji.ndim == 1 else a.j_has_user[ji[:, 0]]
    if users.any():
        rj, ro = _rows(ji, oi, users)
        chord_sq = (
            (a.j_xyz[rj, 0] - a.o_xyz[ro, 0]) ** 2
            + (a.j_xyz[rj, 1] - a.o_xyz[ro, 1]) ** 2
            + (a.j_xyz[rj, 2] - a.o_xyz[ro, 2]) ** 2
        )
        km = 2 * EARTH_RADIUS_KM * np.arcsin(np.minimum(1.0, np.sqrt(chord_sq) / 2))
        rtt[users] = km / KM_PER_MS_ROUND_TRIP
    return rtt


def _unit_vectors(lat: Floats, lon: Floats) -> Floats:
    """Points on the unit sphere for latitudes and longitudes in radians."""
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)


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
