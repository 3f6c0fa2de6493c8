"""The solver's data: offers, jobs and weights in; a result out.

Field names and meanings follow the market rules (docs/market.md). Prices are
floats here; the broker recomputes what it charges exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from solver.relax import Warm


@dataclass(frozen=True, slots=True)
class Offer:
    """An ask: ``count`` identical free accelerators on one node."""

    id: str
    vendor: str
    accelerator: str
    platform: str
    count: int
    memory_gib: float
    tflops_bf16: float
    tflops_fp32: float
    mem_bw_gbps: float
    price_per_hour: float
    region: str
    country: str
    lat: float
    lon: float
    available_hours: float | None = None
    efficiency: float = 0.4
    startup_seconds: float = 0.0  # before a program's work starts: loading, compiling
    transfer_s_per_gb: float = 0.0  # moving a program's inputs in and results out, per GB
    compile_s_per_kb: float = 0.0  # compiling a program (and its first run), per KB of it
    power_w: float = 0.0  # per accelerator, under load (0: not known, no energy counted)
    pue: float = 1.0  # the site's power usage effectiveness
    grid_g_per_kwh: float = 0.0  # carbon intensity of the grid it draws from
    # Fractions (solver/fractions.py): "whole" accelerators, one GPU's "mig"
    # slices, or "shared" GPUs in ``shares`` equal time-sliced shares each.
    fraction_kind: str = "whole"
    mig_profiles: tuple[str, ...] = ()  # Profile.spec of each profile the GPU can be cut into
    mig_instances: tuple[str, ...] = ()  # free MIG instances, "PROFILE@START"
    mig_busy: tuple[str, ...] = ()  # MIG instances in use, "PROFILE@START"
    # The GPU is sold as cut: no instance is made or re-cut (an agent's GPU, which
    # its agent does not partition).
    mig_fixed: bool = False
    shares: int = 0
    # Shared offers: shares already taken on each of the ``count`` GPUs (missing: none).
    shares_busy: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Job:
    """A bid for ``accelerators`` accelerators on one offer."""

    id: str
    platforms: tuple[str, ...]
    max_price_per_hour: float
    accelerators: int = 1
    min_memory_gib: float = 0.0
    vendors: tuple[str, ...] = ()
    accelerator_models: tuple[str, ...] = ()
    duration_hours: float | None = None
    flops: float | None = None
    bytes: float | None = None
    io_gb: float = 0.0  # a program's inputs and results (and checkpoints), in GB
    program_kb: float = 0.0  # the serialized program's size, in KB
    dtype: str = "bf16"
    deadline_hours: float | None = None
    latency_slo_ms: float | None = None
    user_lat: float | None = None
    user_lon: float | None = None
    data_region: str | None = None
    data_gb: float | None = None
    allowed_countries: tuple[str, ...] = ()
    priority: int = 1
    budget_usd: float | None = None  # the most its run may cost, the broker's fee included
    max_gco2: float | None = None  # the most CO2e its run may emit, in grams
    carbon_usd_per_t: float | None = None  # its own carbon price (None: the market's)
    # Part of one GPU (solver/fractions.py): a fraction of its compute and memory,
    # a MIG profile, or at least ``min_compute`` of its compute (with min_memory_gib).
    fraction: float | None = None
    mig_profile: str | None = None
    min_compute: float | None = None
    accepts_shared: bool = False  # may run on shared (not isolated) GPUs
    # Only this offer (a service's replica, where the service's placement put it).
    offer_id: str | None = None


@dataclass(frozen=True, slots=True)
class Weights:
    placement_value_usd: float = 10_000.0
    egress_usd_per_gb: float = 0.09
    latency_usd_per_ms: float = 0.0
    fee_rate: float = 0.0  # the broker's fee, a fraction of the compute charge (0.05 = 5 %)
    carbon_usd_per_t: float = 0.0  # the market's carbon price, for jobs that set none
    # A fractional match's value drops by this share of the job's value per GPU of
    # compute its slice holds beyond the job's ask (solver/packing.py): the round then
    # prefers jobs that fill their slices to jobs that strand part of them.
    slice_idle_weight: float = 0.25


@dataclass(frozen=True, slots=True)
class Market:
    offers: tuple[Offer, ...]
    jobs: tuple[Job, ...]
    weights: Weights = field(default_factory=Weights)


@dataclass(frozen=True, slots=True)
class Assignment:
    """Job ``job`` runs on offer ``offer``; ``cost`` = compute + egress + latency + carbon (USD)."""

    job: str
    offer: str
    cost: float
    runtime_hours: float
    compute_usd: float
    egress_usd: float
    latency_usd: float
    rtt_ms: float
    startup_seconds: float = 0.0  # of the runtime, start-up and transfer (programs only)
    energy_kwh: float = 0.0
    gco2: float = 0.0
    carbon_usd: float = 0.0  # the carbon price's part of ``cost`` (not charged)
    slice: str = ""  # fractional jobs: "3g.40gb@4" (MIG) or "2/8 shared" (shares of GPU n)
    share: float = 1.0  # of one accelerator, what the job is billed for


@dataclass(frozen=True, slots=True)
class Result:
    status: str  # OPTIMAL, FEASIBLE, INFEASIBLE or UNKNOWN
    objective: float
    bound: float | None
    solve_seconds: float
    assignments: tuple[Assignment, ...]
    unassigned: tuple[str, ...]
    stats: dict[str, float] = field(default_factory=dict)
    # Of the unassigned, the jobs that no offer of this market may take at all
    # (every rule applied): they stay unplaceable until the offers change.
    unplaceable: tuple[str, ...] = ()
    # What the next round over much the same book starts its LP from (rounds with gangs).
    warm: Warm | None = None
    # MIG offers whose GPU the answer re-partitions (idle GPUs only): the full new layout.
    repartitions: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        """Relative distance to the bound (0 = proven optimal)."""
        if self.bound is None:
            return None
        if self.bound <= 0:
            return 0.0 if self.objective >= self.bound - 1e-9 else None
        return max(0.0, (self.bound - self.objective) / self.bound)

    def to_json(self) -> dict[str, Any]:
        """The answer in the market-file form."""
        return {
            "status": self.status,
            "objective": self.objective,
            "bound": self.bound,
            "gap": self.gap,
            "solve_seconds": self.solve_seconds,
            "assignments": [
                {"job": a.job, "offer": a.offer, "cost": a.cost} | _parts(a)
                for a in self.assignments
            ],
            "unassigned": list(self.unassigned),
        }


def _parts(a: Assignment) -> dict[str, float]:
    return {
        "runtime_hours": a.runtime_hours,
        "compute_usd": a.compute_usd,
        "egress_usd": a.egress_usd,
        "latency_usd": a.latency_usd,
        "carbon_usd": a.carbon_usd,
        "energy_kwh": a.energy_kwh,
        "gco2": a.gco2,
    }


class MarketFileError(ValueError):
    """A market file that does not follow the file form; the message says where."""


_TUPLE_FIELDS = {"platforms", "vendors", "accelerator_models", "allowed_countries"}
_OFFER_TUPLES = {"mig_profiles", "mig_instances", "mig_busy"}


def _build(cls: type[Any], raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise MarketFileError(f"{where}: expected an object")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise MarketFileError(f"{where}: unknown field {unknown[0]!r}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if value is None:
            continue  # absent optional fields may be null
        if name in _TUPLE_FIELDS | _OFFER_TUPLES:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise MarketFileError(f"{where}.{name}: expected a list of strings")
            value = tuple(value)
        values[name] = value
    try:
        obj = cls(**values)
    except TypeError as exc:
        missing = str(exc).split("argument")[-1].strip(": ")
        raise MarketFileError(f"{where}: missing required field {missing}") from None
    _check_types(obj, where)
    _check_ranges(obj, where)
    return obj


def _check_types(obj: Any, where: str) -> None:
    for f in fields(obj):
        value = getattr(obj, f.name)
        kind = str(f.type)
        if value is None or f.name in _TUPLE_FIELDS | _OFFER_TUPLES:
            continue
        if kind.startswith("bool") and not isinstance(value, bool):
            raise MarketFileError(f"{where}.{f.name}: expected true or false")
        if kind.startswith("str") and not isinstance(value, str):
            raise MarketFileError(f"{where}.{f.name}: expected a string")
        if kind.startswith(("float", "int")) and (
            isinstance(value, bool) or not isinstance(value, int | float)
        ):
            raise MarketFileError(f"{where}.{f.name}: expected a number")
        if kind.startswith("int") and not float(value).is_integer():
            raise MarketFileError(f"{where}.{f.name}: expected an integer")


# Ranges the file form shares with the API: (field, test, what it must be).
_RANGES: dict[str, tuple[Any, str]] = {
    "count": (lambda v: v >= 0, "at least 0"),
    "accelerators": (lambda v: v >= 1, "at least 1"),
    "priority": (lambda v: v >= 1, "at least 1"),
    "efficiency": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "startup_seconds": (lambda v: v >= 0, "at least 0"),
    "transfer_s_per_gb": (lambda v: v >= 0, "at least 0"),
    "io_gb": (lambda v: v >= 0, "at least 0"),
    "compile_s_per_kb": (lambda v: v >= 0, "at least 0"),
    "program_kb": (lambda v: v >= 0, "at least 0"),
    "power_w": (lambda v: v >= 0, "at least 0"),
    "pue": (lambda v: 1 <= v <= 5, "in [1, 5]"),
    "grid_g_per_kwh": (lambda v: v >= 0, "at least 0"),
    "max_gco2": (lambda v: v >= 0, "at least 0"),
    "carbon_usd_per_t": (lambda v: v >= 0, "at least 0"),
    "slice_idle_weight": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "memory_gib": (lambda v: v >= 0, "at least 0"),
    "min_memory_gib": (lambda v: v >= 0, "at least 0"),
    "tflops_bf16": (lambda v: v > 0, "positive"),
    "tflops_fp32": (lambda v: v > 0, "positive"),
    "mem_bw_gbps": (lambda v: v > 0, "positive"),
    "price_per_hour": (lambda v: v >= 0, "at least 0"),
    "max_price_per_hour": (lambda v: v >= 0, "at least 0"),
    "lat": (lambda v: -90 <= v <= 90, "a latitude"),
    "lon": (lambda v: -180 <= v <= 180, "a longitude"),
    "user_lat": (lambda v: -90 <= v <= 90, "a latitude"),
    "user_lon": (lambda v: -180 <= v <= 180, "a longitude"),
    "duration_hours": (lambda v: v > 0, "positive"),
    "deadline_hours": (lambda v: v > 0, "positive"),
    "available_hours": (lambda v: v > 0, "positive"),
    "latency_slo_ms": (lambda v: v > 0, "positive"),
    "flops": (lambda v: v >= 0, "at least 0"),
    "bytes": (lambda v: v >= 0, "at least 0"),
    "data_gb": (lambda v: v >= 0, "at least 0"),
    "budget_usd": (lambda v: v >= 0, "at least 0"),
    "fee_rate": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "dtype": (lambda v: v in ("bf16", "fp32"), "bf16 or fp32"),
    "platforms": (lambda v: len(v) > 0, "a non-empty list"),
    "fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "min_compute": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "shares": (lambda v: 0 <= v <= 64, "in [0, 64]"),
    "fraction_kind": (lambda v: v in ("whole", "mig", "shared"), "whole, mig or shared"),
}


def _check_ranges(obj: Any, where: str) -> None:
    for name, (ok, what) in _RANGES.items():
        value = getattr(obj, name, None)
        if value is not None and not ok(value):
            raise MarketFileError(f"{where}.{name}: must be {what}")


def load_market(data: dict[str, Any]) -> Market:
    """A Market from the file form ``{"offers": [...], "jobs": [...], "weights": {...}}``."""
    if not isinstance(data, dict):
        raise MarketFileError("a market file is a JSON object with offers, jobs and weights")
    offers = tuple(_build(Offer, o, f"offers[{i}]") for i, o in enumerate(data.get("offers") or []))
    jobs = tuple(_build(Job, j, f"jobs[{i}]") for i, j in enumerate(data.get("jobs") or []))
    weights = _build(Weights, data.get("weights") or {}, "weights")
    for i, o in enumerate(offers):
        _check_fraction_offer(o, f"offers[{i}]")
    for kind, items in (("offer", offers), ("job", jobs)):
        seen: set[str] = set()
        for item in items:
            if item.id in seen:
                raise MarketFileError(f"duplicate {kind} id {item.id!r}")
            seen.add(item.id)
    return Market(offers=offers, jobs=jobs, weights=weights)


def _check_fraction_offer(o: Offer, where: str) -> None:
    from solver.fractions import Gpu

    if o.fraction_kind == "mig":
        if o.count != 1:
            raise MarketFileError(f"{where}.count: a MIG offer is one GPU (count 1)")
        try:
            Gpu.of(o)
        except ValueError as exc:
            raise MarketFileError(f"{where}: {exc}") from None
    if o.fraction_kind == "shared" and o.shares < 1:
        raise MarketFileError(f"{where}.shares: a shared offer has at least 1 share per GPU")


def load_market_file(path: str) -> Market:
    with open(path, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise MarketFileError(f"{path}: not JSON ({exc})") from None
    return load_market(data)


def dump_market(market: Market) -> dict[str, Any]:
    return {
        "offers": [
            asdict(o) | {k: list(getattr(o, k)) for k in _OFFER_TUPLES} for o in market.offers
        ],
        "jobs": [asdict(j) | {k: list(getattr(j, k)) for k in _TUPLE_FIELDS} for j in market.jobs],
        "weights": asdict(market.weights),
    }
