"""Rows to the solver's plain data, and the solver's estimates back to exact money."""

from __future__ import annotations

from dataclasses import replace
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from typing import Any, cast

from sqlalchemy import Row

from adapters import grid, mig
from broker.billing.amounts import PPM
from broker.config import Settings
from broker.market.estimates import MAX_COMPILE_S_PER_KB, MAX_STARTUP_S, MAX_TRANSFER_S_PER_GB
from broker.models.job import Job
from broker.models.offer import FractionKind, Offer
from broker.money import MICROS_PER_USD
from solver import market as sm
from solver.fractions import parse_instance, parse_shares


def weights(settings: Settings, fee_ppm: int) -> sm.Weights:
    return sm.Weights(
        placement_value_usd=float(settings.placement_value_usd),
        egress_usd_per_gb=float(settings.egress_usd_per_gb),
        latency_usd_per_ms=float(settings.latency_usd_per_ms),
        fee_rate=fee_ppm / PPM,
        carbon_usd_per_t=float(settings.carbon_usd_per_t),
        slice_idle_weight=float(settings.slice_idle_weight),
    )


_Columns = Row[*tuple[Any, ...]]

# The columns ``offer`` and ``job`` read: a round selects only these (rows of plain
# columns cost a fraction of ORM objects). Not an offer's ``count``: on a row that
# name is ``tuple.count``, so it is passed on its own.
OFFER_COLUMNS = (
    Offer.id,
    Offer.updated_at,
    Offer.vendor,
    Offer.accelerator,
    Offer.platform,
    Offer.memory_gib,
    Offer.tflops_bf16,
    Offer.tflops_fp32,
    Offer.mem_bw_gbps,
    Offer.price_per_hour_micros,
    Offer.region,
    Offer.country,
    Offer.lat,
    Offer.lon,
    Offer.available_hours,
    Offer.efficiency,
    Offer.power_w,
    Offer.pue,
    Offer.grid_g_per_kwh,
    Offer.startup_seconds,
    Offer.transfer_s_per_gb,
    Offer.compile_s_per_kb,
    Offer.fraction_kind,
    Offer.shares,
    Offer.memory_per_share_gib,
    Offer.mig_instances,
    Offer.mig_busy,
    Offer.device,
)
JOB_COLUMNS = (
    Job.id,
    Job.updated_at,
    Job.platforms,
    Job.max_price_per_hour_micros,
    Job.accelerators,
    Job.min_memory_gib,
    Job.vendors,
    Job.accelerator_models,
    Job.duration_hours,
    Job.flops,
    Job.bytes,
    Job.io_bytes,
    Job.program_bytes,
    Job.dtype,
    Job.deadline_hours,
    Job.max_gco2,
    Job.carbon_usd_per_t,
    Job.latency_slo_ms,
    Job.user_lat,
    Job.user_lon,
    Job.data_region,
    Job.data_gb,
    Job.allowed_countries,
    Job.priority,
    Job.fraction_milli,
    Job.mig_profile,
    Job.accepts_shared,
    Job.pinned_offer_id,
)


def offer(row: Offer | _Columns, count: int | None = None) -> sm.Offer:
    """An offer row, or a row of ``OFFER_COLUMNS`` and its free ``count``, as the
    solver sees it."""
    return sm.Offer(
        id=row.id,
        vendor=row.vendor,
        accelerator=row.accelerator,
        platform=row.platform,
        count=cast(Offer, row).count if count is None else count,
        memory_gib=row.memory_gib
        if row.fraction_kind != FractionKind.shared
        # What a shared accelerator sells: its shares' memory (``memory_gib / shares``
        # each, to the solver).
        else row.shares * (row.memory_per_share_gib or 0.0),
        tflops_bf16=row.tflops_bf16,
        tflops_fp32=row.tflops_fp32,
        mem_bw_gbps=row.mem_bw_gbps,
        price_per_hour=row.price_per_hour_micros / MICROS_PER_USD,
        region=row.region,
        country=row.country,
        lat=row.lat,
        lon=row.lon,
        available_hours=row.available_hours,
        efficiency=row.efficiency,
        startup_seconds=min(row.startup_seconds or 0.0, MAX_STARTUP_S),
        transfer_s_per_gb=min(row.transfer_s_per_gb or 0.0, MAX_TRANSFER_S_PER_GB),
        compile_s_per_kb=min(row.compile_s_per_kb or 0.0, MAX_COMPILE_S_PER_KB),
        fraction_kind=FractionKind(row.fraction_kind).value,
        shares=row.shares,
        mig_profiles=mig.specs(row.accelerator) if row.fraction_kind == FractionKind.mig else (),
        mig_instances=tuple(row.mig_instances),
        mig_busy=tuple(row.mig_busy),
        # An agent's MIG GPU (it names the device) is sold as its agent cut it, and an
        # AMD GPU as it is partitioned (one mode for all of it).
        mig_fixed=row.device is not None or mig.partitioned_whole(row.accelerator),
        # Only the three energy fields: float-valued, whatever else Offer holds.
        **cast(
            dict[str, Any],
            grid.offer_energy(
                row.vendor,
                row.accelerator,
                row.country,
                row.region,
                power_w=row.power_w,
                pue=row.pue,
                grid_g_per_kwh=row.grid_g_per_kwh,
            ),
        ),
    )


def job(row: Job | _Columns, budget_left_micros: Fraction | None = None) -> sm.Job:
    """A job row, or a row of ``JOB_COLUMNS``, as the solver sees it.

    ``budget_left_micros``: what is left of the job's budget after its earlier
    runs (None: no budget)."""
    return sm.Job(
        id=row.id,
        platforms=tuple(row.platforms),
        max_price_per_hour=row.max_price_per_hour_micros / MICROS_PER_USD,
        accelerators=row.accelerators,
        min_memory_gib=row.min_memory_gib,
        vendors=tuple(row.vendors),
        accelerator_models=tuple(row.accelerator_models),
        duration_hours=row.duration_hours,
        flops=row.flops,
        bytes=row.bytes,
        io_gb=(row.io_bytes or 0.0) / 1e9,
        program_kb=(row.program_bytes or 0) / 1000,
        dtype=row.dtype or "bf16",
        deadline_hours=row.deadline_hours,
        max_gco2=row.max_gco2,
        carbon_usd_per_t=row.carbon_usd_per_t,
        latency_slo_ms=row.latency_slo_ms,
        user_lat=row.user_lat,
        user_lon=row.user_lon,
        data_region=row.data_region,
        data_gb=row.data_gb,
        allowed_countries=tuple(row.allowed_countries),
        priority=row.priority,
        budget_usd=None if budget_left_micros is None else float(budget_left_micros) / 1e6,
        fraction=None if row.fraction_milli is None else row.fraction_milli / 1000,
        mig_profile=row.mig_profile,
        accepts_shared=row.accepts_shared,
        offer_id=row.pinned_offer_id,
    )


def open_shares(offer: sm.Offer, capacity: int, held: dict[int, int]) -> sm.Offer:
    """A shared offer as the solver sees it: its accelerators with a share free, in
    order (``open_gpus``), each with the shares matches hold of it."""
    gpus = open_gpus(capacity, offer.shares, held)
    return replace(offer, count=len(gpus), shares_busy=tuple(held.get(g, 0) for g in gpus))


def open_gpus(capacity: int, shares: int, held: dict[int, int]) -> list[int]:
    """A shared offer's accelerators with a share free: the solver's GPU ``b`` is the
    ``b``-th of them."""
    return [g for g in range(capacity) if held.get(g, 0) < shares]


def share_of(offer_kind: str, accelerator: str, slice_: str) -> Fraction:
    """The exact part of one accelerator a fractional match holds, from its slice
    ("3g.40gb@4": the profile's compute slices over the GPU's; "2/8 shared on GPU 1":
    2 of 8 shares). ValueError for a slice that does not fit the offer."""
    if offer_kind == FractionKind.mig:
        name, start = parse_instance(slice_)
        profile = {p.name: p for p in mig.profiles(accelerator)}.get(name)
        if profile is None or start not in profile.starts:
            raise ValueError(f"MIG instance {slice_!r} is not one of {accelerator}'s")
        return Fraction(profile.compute, profile.total)
    if offer_kind == FractionKind.shared:
        k, total, _ = parse_shares(slice_)
        return Fraction(k, total)
    raise ValueError(f"a whole offer has no slices ({slice_!r})")


def _micros(amount: Decimal) -> int:
    return int(amount.to_integral_value(rounding=ROUND_HALF_EVEN))


def exact_cost(
    job: Job | _Columns,
    offer: Offer | _Columns,
    runtime_hours: float,
    rtt_ms: float,
    settings: Settings,
    share: Fraction = Fraction(1),
) -> tuple[int, int, int]:
    """Compute, egress and latency cost in micro-dollars, from the locked ask;
    ``share``: of one accelerator, for a fractional match.

    The runtime and round trip are the solver's estimates (floats, converted
    exactly); each part is rounded half-even to the micro-dollar once.
    """
    compute = _micros(
        Decimal(offer.price_per_hour_micros)
        * job.accelerators
        * Decimal(runtime_hours)
        * share.numerator
        / share.denominator
    )
    egress = 0
    if job.data_region is not None and job.data_region != offer.region and job.data_gb:
        egress = _micros(Decimal(str(job.data_gb)) * settings.egress_usd_per_gb * MICROS_PER_USD)
    latency = _micros(Decimal(rtt_ms) * settings.latency_usd_per_ms * MICROS_PER_USD)
    return compute, egress, latency
