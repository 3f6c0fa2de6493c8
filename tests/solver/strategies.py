"""Hypothesis strategies for small, contested markets."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import strategies as st

from solver.market import Job, Market, Offer, Weights

PLACES = [
    ("eu-west", "NL", 52.4, 4.9),
    ("eu-central", "DE", 50.1, 8.7),
    ("us-east", "US", 38.9, -77.0),
    ("ap-south", "IN", 19.1, 72.9),
]
HARDWARE = [
    ("nvidia", "h100-sxm", "cuda", 80, 989, 67, 3350),
    ("nvidia", "l4", "cuda", 24, 121, 30.3, 300),
    ("amd", "mi300x", "rocm", 192, 1307.4, 81.7, 5300),
    ("google", "tpu-v5e", "tpu", 16, 197, 197, 819),
]
PRICES = st.sampled_from([0.5, 1.2, 2.0, 2.49, 3.1, 4.0])
MAYBE = st.none()


@st.composite
def offers(draw: st.DrawFn, index: int) -> Offer:
    vendor, model, platform, memory, bf16, fp32, bw = draw(st.sampled_from(HARDWARE))
    region, country, lat, lon = draw(st.sampled_from(PLACES))
    return Offer(
        id=f"o{index}",
        vendor=vendor,
        accelerator=model,
        platform=platform,
        count=draw(st.integers(1, 4)),
        memory_gib=memory,
        tflops_bf16=bf16,
        tflops_fp32=fp32,
        mem_bw_gbps=bw,
        price_per_hour=draw(PRICES),
        region=region,
        country=country,
        lat=lat,
        lon=lon,
        available_hours=draw(st.one_of(MAYBE, st.sampled_from([1.0, 4.0, 24.0]))),
        efficiency=draw(st.sampled_from([0.3, 0.4, 0.6])),
        startup_seconds=draw(st.sampled_from([0.0, 0.0, 30.0, 3600.0])),
        transfer_s_per_gb=draw(st.sampled_from([0.0, 0.0, 2.0, 60.0])),
        compile_s_per_kb=draw(st.sampled_from([0.0, 0.03, 1.0])),
        power_w=draw(st.sampled_from([0.0, 75.0, 350.0, 700.0])),
        pue=draw(st.sampled_from([1.0, 1.1, 1.5])),
        grid_g_per_kwh=draw(st.sampled_from([0.0, 30.0, 450.0, 900.0])),
    )


@st.composite
def jobs(draw: st.DrawFn, index: int) -> Job:
    by_work = draw(st.booleans())
    users = draw(st.one_of(MAYBE, st.sampled_from(PLACES)))
    data = draw(st.one_of(MAYBE, st.sampled_from(PLACES)))
    return Job(
        id=f"j{index}",
        platforms=tuple(draw(st.sets(st.sampled_from(["cuda", "rocm", "tpu"]), min_size=1))),
        max_price_per_hour=draw(PRICES),
        accelerators=draw(st.sampled_from([1, 1, 1, 2, 3])),
        min_memory_gib=draw(st.sampled_from([0, 0, 20, 100])),
        vendors=tuple(draw(st.sets(st.sampled_from(["nvidia", "amd"]), max_size=1))),
        duration_hours=None if by_work else draw(st.sampled_from([0.5, 2.0, 10.0])),
        flops=draw(st.sampled_from([1e17, 1e18, 5e18])) if by_work else None,
        bytes=draw(st.sampled_from([1e14, 1e16])) if by_work else None,
        io_gb=draw(st.sampled_from([0.0, 0.5, 50.0])) if by_work else 0.0,
        program_kb=draw(st.sampled_from([0.0, 4.0, 400.0])) if by_work else 0.0,
        dtype=draw(st.sampled_from(["bf16", "fp32"])),
        deadline_hours=draw(st.one_of(MAYBE, st.sampled_from([1.0, 3.0, 12.0]))),
        latency_slo_ms=draw(st.sampled_from([None, 30.0, 90.0])) if users else None,
        user_lat=users[2] if users else None,
        user_lon=users[3] if users else None,
        data_region=data[0] if data else None,
        data_gb=draw(st.sampled_from([10.0, 500.0])) if data else None,
        allowed_countries=tuple(draw(st.sets(st.sampled_from(["NL", "DE", "US"]), max_size=2))),
        priority=draw(st.sampled_from([1, 1, 2, 5])),
        max_gco2=draw(st.sampled_from([None, None, 500.0, 5000.0])),
        carbon_usd_per_t=draw(st.sampled_from([None, None, 0.0, 100.0, 5000.0])),
    )


@st.composite
def markets(draw: st.DrawFn, max_jobs: int = 7, max_offers: int = 4) -> Market:
    n_offers = draw(st.integers(1, max_offers))
    n_jobs = draw(st.integers(1, max_jobs))
    return Market(
        offers=tuple(draw(offers(i)) for i in range(n_offers)),
        jobs=tuple(draw(jobs(i)) for i in range(n_jobs)),
        weights=Weights(
            placement_value_usd=draw(st.sampled_from([10.0, 100.0, 10_000.0])),
            egress_usd_per_gb=0.09,
            latency_usd_per_ms=draw(st.sampled_from([0.0, 0.05])),
            carbon_usd_per_t=draw(st.sampled_from([0.0, 200.0])),
        ),
    )


@st.composite
def gang_markets(draw: st.DrawFn, max_jobs: int = 10, max_offers: int = 4) -> Market:
    """Markets where most jobs are gangs of 2-8 accelerators and offers hold 1-16:
    rounds that are knapsack problems, not transportation problems."""
    market = draw(markets(max_jobs=max_jobs, max_offers=max_offers))
    sizes = st.sampled_from([1, 2, 2, 4, 4, 8])
    counts = st.sampled_from([1, 2, 4, 6, 8, 16])
    return Market(
        offers=tuple(replace(o, count=draw(counts)) for o in market.offers),
        jobs=tuple(replace(j, accelerators=draw(sizes)) for j in market.jobs),
        weights=market.weights,
    )
