"""The hardware catalog: one row per accelerator model the market knows.

The figures are peak per-accelerator numbers from vendor datasheets, kept in
``adapters/data/accelerators.csv``. That file was built from the project's
reference table ``shared/data/accelerators.csv`` (vendor datasheets named per
row); ``adapters/data/SOURCES.md`` says how it was reshaped and gaps filled.
This is the only hardware catalog in the project: the broker fills offers from
it and adapters map device names to its keys.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from importlib import resources

VENDORS = ("nvidia", "amd", "google", "edge", "cpu", "other")
PLATFORMS = ("cuda", "rocm", "tpu", "cpu")


@dataclass(frozen=True, slots=True)
class AcceleratorSpec:
    """Peak figures of one accelerator model, per accelerator."""

    key: str
    name: str
    vendor: str
    platform: str
    form_factor: str
    memory_gib: float
    tflops_bf16: float
    tflops_fp32: float
    mem_bw_gbps: float
    tdp_w: float | None
    aliases: tuple[str, ...]
    source: str


def normalize_key(name: str) -> str:
    """The canonical spelling of a model name: lower case, dashes for spaces."""
    return "-".join(name.strip().lower().replace("_", " ").split())


@cache
def _load() -> tuple[dict[str, AcceleratorSpec], dict[str, str]]:
    specs: dict[str, AcceleratorSpec] = {}
    names: dict[str, str] = {}
    text = resources.files("adapters").joinpath("data/accelerators.csv").read_text("utf-8")
    for row in csv.DictReader(text.splitlines()):
        aliases = tuple(a for a in row["aliases"].split(";") if a)
        spec = AcceleratorSpec(
            key=row["key"],
            name=row["name"],
            vendor=row["vendor"],
            platform=row["platform"],
            form_factor=row["form_factor"],
            memory_gib=float(row["memory_gib"]),
            tflops_bf16=float(row["tflops_bf16"]),
            tflops_fp32=float(row["tflops_fp32"]),
            mem_bw_gbps=float(row["mem_bw_gbps"]),
            tdp_w=float(row["tdp_w"]) if row["tdp_w"] else None,
            aliases=aliases,
            source=row["source"],
        )
        if spec.vendor not in VENDORS or spec.platform not in PLATFORMS:
            raise ValueError(f"catalog row {spec.key}: unknown vendor or platform")
        specs[spec.key] = spec
        for name in (spec.key, normalize_key(spec.name), *aliases):
            names[normalize_key(name)] = spec.key
    return specs, names


def lookup(name: str) -> AcceleratorSpec | None:
    """The catalog entry for a model key, alias or full name; None if unknown."""
    specs, names = _load()
    key = names.get(normalize_key(name))
    return specs[key] if key else None


def all_specs() -> list[AcceleratorSpec]:
    """Every catalog entry, in catalog order."""
    return list(_load()[0].values())
