"""Grid carbon intensity: grams of CO2-equivalent per kWh where an offer runs.

A cloud region's own figure when one is published (``data/grid_regions.csv``),
else its country's yearly average (``data/grid_countries.csv``); both copied
from the ``codecarbon`` package's data, see ``data/SOURCES.md``. A provider may
state its own figure instead (a power purchase agreement, an on-site plant).

Also the default power usage effectiveness (PUE) of a kind of site: the energy
a data centre draws for each unit its IT equipment uses.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from adapters import catalog

DATA = Path(__file__).parent / "data"

#: Default PUE per kind of site, used when a provider states none. Hyperscale
#: clouds report fleet averages of about 1.1 (Google 1.10, 2023; AWS 1.15 and
#: Azure 1.18 in their sustainability reports); colocation sites average about
#: 1.5 (Uptime Institute's annual survey, 2023: 1.58); an edge device or a
#: machine in an office has no cooling plant of its own to count.
PUE_BY_SITE = {"cloud": 1.1, "colocation": 1.5, "edge": 1.0}
#: Where neither the region nor the country is known: the world's average, the
#: mean of the countries in the same codecarbon file weighted by their
#: generation (29,476 TWh), so that an unknown grid never looks clean.
WORLD_G_CO2E_PER_KWH = 480.6


@dataclass(frozen=True, slots=True)
class Intensity:
    g_co2e_per_kwh: float
    source: str  # "region", "country", or "world"


@cache
def _regions() -> dict[tuple[str, str], float]:
    with (DATA / "grid_regions.csv").open(newline="", encoding="utf-8") as fh:
        return {(r["cloud"], r["region"]): float(r["g_co2e_per_kwh"]) for r in csv.DictReader(fh)}


@cache
def _countries() -> dict[str, float]:
    with (DATA / "grid_countries.csv").open(newline="", encoding="utf-8") as fh:
        return {r["country"]: float(r["g_co2e_per_kwh"]) for r in csv.DictReader(fh)}


def intensity(country: str, region: str = "", cloud: str = "") -> Intensity:
    """The grid's intensity for ``region`` of ``cloud`` if published, else for
    ``country`` (ISO 3166-1 alpha-2); the world's average, with source "world",
    when neither is known."""
    by_region = _regions().get((cloud.lower(), region))
    if by_region is not None:
        return Intensity(by_region, "region")
    by_country = _countries().get(country.upper())
    if by_country is not None:
        return Intensity(by_country, "country")
    return Intensity(WORLD_G_CO2E_PER_KWH, "world")


def offer_energy(
    vendor: str,
    model: str,
    country: str,
    region: str,
    *,
    power_w: float | None = None,
    pue: float | None = None,
    grid_g_per_kwh: float | None = None,
) -> dict[str, float]:
    """An offer's ``power_w`` per accelerator, ``pue`` and ``grid_g_per_kwh``: what its
    provider stated, else the defaults (``default_energy``)."""
    stated = {"power_w": power_w, "pue": pue, "grid_g_per_kwh": grid_g_per_kwh}
    return default_energy(vendor, model, country, region) | {
        k: float(v) for k, v in stated.items() if v is not None
    }


@cache
def default_energy(vendor: str, model: str, country: str, region: str) -> dict[str, float]:
    """What an offer draws and emits by default: its model's datasheet power (TDP), the
    PUE of its kind of site (edge devices 1.0; otherwise a colocation site's 1.5, as
    the broker cannot tell a hyperscale cloud's floor from a small data centre's), and
    its region's or country's grid intensity."""
    spec = catalog.lookup(model)
    site = "edge" if vendor == "edge" else "colocation"
    return {
        "power_w": float(spec.tdp_w or 0.0) if spec is not None else 0.0,
        "pue": PUE_BY_SITE[site],
        "grid_g_per_kwh": intensity(country, region).g_co2e_per_kwh,
    }
