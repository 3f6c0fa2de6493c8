"""A developer's energy and carbon by month, from the runs that started.

Each match records its estimated energy at the wall and emissions when it is
made (docs/market.md); a run whose agent measured its devices' power records
what it really used (``broker.agent.energy``). A month's figures take the
measurement where there is one and the estimate of the whole match otherwise,
and say which (``basis``: measured, estimated, or mixed).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.models.job import Job
from broker.models.market import Allocation


@dataclass(frozen=True)
class Month:
    period: str  # YYYY-MM, by when the runs started (UTC)
    runs: int
    energy_kwh: float
    gco2: float
    basis: str = "estimated"


@dataclass(frozen=True)
class Footprint:
    """An active offer's price and the carbon of one of its accelerators for an hour."""

    offer_id: str
    accelerator: str
    region: str
    price_per_hour: float
    gco2_per_hour: float


def footprints(session: Session, limit: int = 500) -> list[Footprint]:
    """Active offers with free accelerators, cheapest first, with their carbon per
    accelerator-hour as clearing counts it (stated figures, else the defaults)."""
    from broker.market import adapt
    from broker.models.offer import Offer, OfferStatus

    rows = session.execute(
        select(*adapt.OFFER_COLUMNS, Offer.count.label("free"))
        .where(Offer.status == OfferStatus.active, Offer.count > 0)
        .order_by(Offer.price_per_hour_micros, Offer.id)
        .limit(limit)
    ).all()
    out = []
    for row in rows:
        o = adapt.offer(row, row.free)
        out.append(
            Footprint(
                offer_id=o.id,
                accelerator=o.accelerator,
                region=o.region,
                price_per_hour=o.price_per_hour,
                gco2_per_hour=o.power_w * o.pue / 1000 * o.grid_g_per_kwh,
            )
        )
    return out


def by_month(session: Session, account_id: str) -> list[Month]:
    """The account's runs (matches that started), summed by the month they started."""
    rows = session.execute(
        select(
            Allocation.started_at,
            Allocation.energy_kwh,
            Allocation.gco2,
            Allocation.measured_kwh,
            Allocation.measured_gco2,
        )
        .join(Job, Job.id == Allocation.job_id)
        .where(Job.account_id == account_id, Allocation.started_at.is_not(None))
    ).all()
    sums: dict[str, list[float]] = {}  # runs, kWh, g, measured runs
    for started_at, energy, gco2, measured_kwh, measured_gco2 in rows:
        if started_at is None:
            continue  # excluded by the query; the column is nullable
        total = sums.setdefault(started_at.strftime("%Y-%m"), [0, 0.0, 0.0, 0])
        total[0] += 1
        if measured_kwh is not None:
            total[1] += measured_kwh
            total[2] += measured_gco2 or 0.0
            total[3] += 1
        else:
            total[1] += energy
            total[2] += gco2
    return [
        Month(period=p, runs=int(t[0]), energy_kwh=t[1], gco2=t[2], basis=_basis(t[0], t[3]))
        for p, t in sorted(sums.items())
    ]


def _basis(runs: float, measured: float) -> str:
    return "measured" if measured == runs else "estimated" if not measured else "mixed"
