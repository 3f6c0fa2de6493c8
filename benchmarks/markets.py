"""Realistic benchmark markets built from the reference data in ``benchmarks/data``.

Offers are sampled from SkyPilot catalog prices (``prices.csv``) placed at the
region coordinates of ``regions.csv``; jobs follow the Alibaba GPU cluster trace
v2023 (``jobs.csv``). ``benchmarks/data/SOURCES.md`` says where each file comes
from. The same arguments always give the same market.

    python -m benchmarks.markets --jobs 200 --offers 50 --seed 0 --out market.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import statistics
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from adapters import catalog, grid
from solver.market import Job, Market, Offer, Weights, dump_market

DATA = Path(__file__).parent / "data"

#: SkyPilot accelerator names whose catalog key is not found by plain lookup.
ACCELERATOR_KEYS = {
    "A100": "a100-40gb",
    "A100-80GB": "a100-80gb",
    "H100": "h100-sxm",
    "V100": "v100-16gb",
    "TPU-v5e": "tpu-v5e",
    "TPU-v6e": "tpu-v6e",
    "TPU-v5p": "tpu-v5p",
    "TPU-v4": "tpu-v4",
}
#: GPU models named in the trace's ``gpu_type`` constraints. P100 and the
#: undisclosed G1/G2/G3 have no catalog entry and are dropped.
TRACE_MODELS = {
    "T4": "t4",
    "V100M16": "v100-16gb",
    "V100M32": "v100-32gb",
    "A10": "a10",
}
#: EU member states (ISO 3166-1 alpha-2); residency allow-lists use those present in the data.
EU_COUNTRIES = frozenset(
    [
        "AT",
        "BE",
        "BG",
        "CY",
        "CZ",
        "DE",
        "DK",
        "EE",
        "ES",
        "FI",
        "FR",
        "GR",
        "HR",
        "HU",
        "IE",
        "IT",
        "LT",
        "LU",
        "LV",
        "MT",
        "NL",
        "PL",
        "PT",
        "RO",
        "SE",
        "SI",
        "SK",
    ]
)

#: Clouds whose sites take the hyperscale PUE (``adapters.grid.PUE_BY_SITE``);
#: the GPU clouds and marketplaces in the price sample take a colocation site's.
HYPERSCALE = frozenset({"aws", "gcp", "azure", "oci"})
MAX_ROW_ACCELERATORS = 64  # price rows above this (large TPU slices) are skipped
MAX_OFFER_COUNT = 8  # accelerators per offer: one node
MAX_JOB_HOURS = 72.0
A100_BF16_FLOPS = 312e12
REFERENCE_EFFICIENCY = 0.4
ARITHMETIC_INTENSITY = 200.0  # flops per byte of the generated work
OFFER_EFFICIENCY = 0.4
WHOLE_NODE_SHARE = 0.25  # offers kept whole while counts are cut to reach the oversubscription
#: The multi-accelerator family (``multi_share``): offers keep up to 16 accelerators
#: (a 16-GPU node, or a TPU slice), and a job that is redrawn as a gang asks for 2,
#: 4, 8 or, rarely, 16 of them. The sizes' shares follow the trace's own
#: multi-GPU jobs (8 most common, then 2 and 4) with 16 added for the largest nodes.
FAMILY_MAX_OFFER_COUNT = 16
GANG_SIZES = ((2, 0.3), (4, 0.25), (8, 0.4), (16, 0.05))


@dataclass(frozen=True, slots=True)
class _PriceRow:
    cloud: str
    region: str
    accelerator: str
    accelerator_count: int
    price_per_hour_usd: float
    spec: catalog.AcceleratorSpec


@dataclass(frozen=True, slots=True)
class _Place:
    country: str
    lat: float
    lon: float


@dataclass(frozen=True, slots=True)
class _TraceJob:
    duration_s: float
    num_gpus: int
    gpu_type: str
    memory_mib: float


def _read_csv(name: str) -> list[dict[str, str]]:
    with (DATA / name).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _spec(name: str) -> catalog.AcceleratorSpec | None:
    return catalog.lookup(ACCELERATOR_KEYS.get(name, name))


@cache
def _price_rows() -> tuple[_PriceRow, ...]:
    rows = []
    for raw in _read_csv("prices.csv"):
        count = int(raw["accelerator_count"])
        spec = _spec(raw["accelerator"])
        if spec is None or count > MAX_ROW_ACCELERATORS or not raw["price_per_hour_usd"]:
            continue
        rows.append(
            _PriceRow(
                cloud=raw["cloud"],
                region=raw["region"],
                accelerator=raw["accelerator"],
                accelerator_count=count,
                price_per_hour_usd=float(raw["price_per_hour_usd"]),
                spec=spec,
            )
        )
    return tuple(rows)


@cache
def _places() -> dict[tuple[str, str], _Place]:
    return {
        (r["cloud"], r["region"]): _Place(r["country"], float(r["lat"]), float(r["lon"]))
        for r in _read_csv("regions.csv")
    }


@cache
def _trace_jobs() -> tuple[_TraceJob, ...]:
    return tuple(
        _TraceJob(
            duration_s=float(r["duration_s"]),
            num_gpus=int(r["num_gpus"]),
            gpu_type=r["gpu_type"],
            memory_mib=float(r["memory_mib"]),
        )
        for r in _read_csv("jobs.csv")
    )


def _eu_countries() -> tuple[str, ...]:
    return tuple(sorted({p.country for p in _places().values()} & EU_COUNTRIES))


def _offers(n_offers: int, rng: random.Random, max_count: int = MAX_OFFER_COUNT) -> list[Offer]:
    rows = _price_rows()
    places = _places()
    offers = []
    for i in range(n_offers):
        row = rows[rng.randrange(len(rows))]
        place = places[(row.cloud, row.region)]
        base = round(row.price_per_hour_usd / row.accelerator_count, 6)
        jitter = round(rng.uniform(0.95, 1.05), 6)
        available = None if rng.random() < 0.8 else round(rng.uniform(2.0, 48.0), 2)
        spec = row.spec
        offers.append(
            Offer(
                id=f"o{i}",
                vendor=spec.vendor,
                accelerator=spec.key,
                platform=spec.platform,
                count=min(row.accelerator_count, max_count),
                memory_gib=spec.memory_gib,
                tflops_bf16=spec.tflops_bf16,
                tflops_fp32=spec.tflops_fp32,
                mem_bw_gbps=spec.mem_bw_gbps,
                price_per_hour=round(base * jitter, 6),
                region=row.region,
                country=place.country,
                lat=place.lat,
                lon=place.lon,
                available_hours=available,
                efficiency=OFFER_EFFICIENCY,
                power_w=spec.tdp_w or 0.0,
                pue=grid.PUE_BY_SITE["cloud" if row.cloud in HYPERSCALE else "colocation"],
                grid_g_per_kwh=grid.intensity(place.country, row.region, row.cloud).g_co2e_per_kwh,
            )
        )
    return offers


def _cut_counts(counts: list[int], target: int, rng: random.Random) -> list[int]:
    """Take busy accelerators off at random until ``sum(counts)`` is ``target`` (each >= 1).

    About a quarter of the offers stay whole nodes, so that gang jobs still find
    room; the others lose accelerators at random, as on a partly busy cluster.
    """
    excess = sum(counts) - target
    if excess <= 0:
        return list(counts)
    whole = {i for i in range(len(counts)) if rng.random() < WHOLE_NODE_SHARE}
    pool = [i for i, c in enumerate(counts) if i not in whole for _ in range(c - 1)]
    if len(pool) < excess:  # not enough room: cut every offer
        pool = [i for i, c in enumerate(counts) for _ in range(c - 1)]
    cut = list(counts)
    for i in rng.sample(pool, min(excess, len(pool))):
        cut[i] -= 1
    return cut


def _platforms(rng: random.Random) -> tuple[str, ...]:
    u = rng.random()
    if u < 0.70:
        return ("cuda",)
    if u < 0.85:
        return ("cuda", "rocm")
    if u < 0.95:
        return ("cuda", "rocm", "tpu")
    return ("tpu",)


def _models(gpu_type: str) -> tuple[str, ...]:
    keys = {TRACE_MODELS[m] for m in gpu_type.split("|") if m in TRACE_MODELS}
    return tuple(sorted(keys))


def _priority(rng: random.Random) -> int:
    u = rng.random()
    return 1 if u < 0.80 else 2 if u < 0.95 else 3


def _gang_size(rng: random.Random) -> int:
    u = rng.random()
    for size, share in GANG_SIZES:
        if u < share:
            return size
        u -= share
    return GANG_SIZES[-1][0]


def _jobs(
    n_jobs: int,
    offers: list[Offer],
    rng: random.Random,
    multi_share: float | None = None,
    gangs: random.Random | None = None,
) -> list[Job]:
    """Jobs from the trace; with ``multi_share``, that share of them are gangs,
    their sizes drawn from ``gangs`` (a stream of its own, so that every other
    draw is the same whatever the share)."""
    trace = _trace_jobs()
    gangs = gangs or random.Random(0)
    median_price = statistics.median(o.price_per_hour for o in offers) if offers else 1.0
    regions = sorted({o.region: (o.lat, o.lon) for o in offers}.items())
    eu = _eu_countries()
    jobs = []
    for i in range(n_jobs):
        row = trace[i % len(trace)]
        accelerators = row.num_gpus
        if multi_share is not None:
            accelerators = _gang_size(gangs) if gangs.random() < multi_share else 1
        hours = min(max(row.duration_s, 60.0) / 3600.0, MAX_JOB_HOURS)
        models = _models(row.gpu_type)
        platforms = ("cuda",) if models else _platforms(rng)  # trace models are NVIDIA GPUs
        duration: float | None = hours
        flops: float | None = None
        work_bytes: float | None = None
        dtype = "bf16"
        if rng.random() >= 0.6:
            duration = None
            flops = hours * 3600.0 * A100_BF16_FLOPS * REFERENCE_EFFICIENCY * accelerators
            work_bytes = flops / ARITHMETIC_INTENSITY
            dtype = "fp32" if rng.random() < 0.05 else "bf16"
        memory = min(row.memory_mib / 1024.0, 80.0) if rng.random() < 0.3 else 0.0
        bid = max(round(median_price * rng.lognormvariate(0.0, 0.5), 2), 0.10)
        deadline = round(hours * rng.uniform(1.5, 4.0), 4) if rng.random() < 0.3 else None
        user_lat = user_lon = latency = None
        if regions and rng.random() < 0.2:
            user_lat, user_lon = regions[rng.randrange(len(regions))][1]
            latency = round(rng.uniform(20.0, 150.0), 1)
        data_region = data_gb = None
        if regions and rng.random() < 0.5:
            data_region = regions[rng.randrange(len(regions))][0]
            data_gb = round(rng.uniform(1.0, 500.0), 1)
        u = rng.random()
        allowed = eu if u < 0.10 else ("US",) if u < 0.15 else ()
        jobs.append(
            Job(
                id=f"j{i}",
                platforms=platforms,
                max_price_per_hour=bid,
                accelerators=accelerators,
                min_memory_gib=round(memory, 3),
                accelerator_models=models,
                duration_hours=round(duration, 6) if duration is not None else None,
                flops=flops,
                bytes=work_bytes,
                dtype=dtype,
                deadline_hours=deadline,
                latency_slo_ms=latency,
                user_lat=user_lat,
                user_lon=user_lon,
                data_region=data_region,
                data_gb=data_gb,
                allowed_countries=allowed,
                priority=_priority(rng),
            )
        )
    return jobs


def build_market(
    n_jobs: int,
    n_offers: int,
    seed: int = 0,
    oversubscription: float = 1.6,
    multi_share: float | None = None,
) -> Market:
    """A market of ``n_jobs`` trace jobs bidding for ``n_offers`` catalog offers.

    Offer counts are cut (each stays >= 1) so that demanded accelerators over
    offered accelerators is close to ``oversubscription``; when the offers are
    too few to reach it, they are left as sampled.

    ``multi_share`` (0 to 1) builds the multi-accelerator family instead of the
    trace's sizes (where 1 % of jobs need more than one accelerator): that
    share of jobs are gangs of 2, 4, 8 or 16 (``GANG_SIZES``), and offers keep
    up to 16 accelerators.
    """
    if n_jobs < 0 or n_offers < 0:
        raise ValueError("n_jobs and n_offers must be >= 0")
    if not oversubscription > 0:
        raise ValueError("oversubscription must be > 0")
    if multi_share is not None and not 0 <= multi_share <= 1:
        raise ValueError("multi_share must be in [0, 1]")
    rng = random.Random(seed)
    family = multi_share is not None
    offers = _offers(n_offers, rng, FAMILY_MAX_OFFER_COUNT if family else MAX_OFFER_COUNT)
    jobs = _jobs(n_jobs, offers, rng, multi_share, random.Random(f"gangs-{seed}"))
    demand = sum(j.accelerators for j in jobs)
    target = max(math.ceil(demand / oversubscription), len(offers))
    counts = _cut_counts([o.count for o in offers], target, rng)
    offers = [
        o if c == o.count else replace(o, count=c) for o, c in zip(offers, counts, strict=True)
    ]
    return Market(offers=tuple(offers), jobs=tuple(jobs), weights=Weights())


def write_market(path: Path, market: Market) -> None:
    """Write ``market`` in the market-file form read by ``broker solve``."""
    with path.open("w", encoding="utf-8") as fh:
        json.dump(dump_market(market), fh, indent=1)
        fh.write("\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a benchmark market file.")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--offers", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--oversubscription", type=float, default=1.6)
    parser.add_argument(
        "--multi-share", type=float, default=None, help="share of 2-16 accelerator jobs"
    )
    parser.add_argument("--out", type=Path, default=Path("market.json"))
    args = parser.parse_args(argv)
    market = build_market(
        args.jobs, args.offers, args.seed, args.oversubscription, args.multi_share
    )
    write_market(args.out, market)
    offered = sum(o.count for o in market.offers)
    demanded = sum(j.accelerators for j in market.jobs)
    print(
        f"wrote {args.out}: {len(market.jobs)} jobs ({demanded} accelerators), "
        f"{len(market.offers)} offers ({offered} accelerators)"
    )


if __name__ == "__main__":
    main()
