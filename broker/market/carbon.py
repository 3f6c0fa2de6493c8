"""A developer's energy and carbon by month: the estimates of the matches that ran.

Each match records its estimated energy at the wall and emissions when it is
made (docs/market.md). These figures are estimates, not meter readings: the
agents do not yet report measured power, and the answer says so (``basis``).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.jobs.models import Job
from broker.market.models import Allocation


@dataclass(frozen=True)
class Month:
    period: str  # YYYY-MM, by when the runs started (UTC)
    runs: int
    energy_kwh: float
    gco2: float
    basis: str = "estimated"


def of_run(
    energy_kwh: float, gco2: float, runtime_hours: float, accelerators: int, usage_ms: int
) -> tuple[float, float]:
    """A run's energy and emissions for the time it was metered: the match's estimate per
    accelerator-hour (power x PUE, x the grid's intensity) times the accelerator-hours
    billed. Still an estimate (of power), on measured time."""
    hours = runtime_hours * max(1, accelerators)
    if hours <= 0:
        return 0.0, 0.0
    metered = usage_ms / 3_600_000
    return energy_kwh / hours * metered, gco2 / hours * metered


def by_month(session: Session, account_id: str) -> list[Month]:
    """The account's runs (matches that started), summed by the month they started."""
    rows = session.execute(
        select(Allocation.started_at, Allocation.energy_kwh, Allocation.gco2)
        .join(Job, Job.id == Allocation.job_id)
        .where(Job.account_id == account_id, Allocation.started_at.is_not(None))
    ).all()
    sums: dict[str, list[float]] = {}
    for started_at, energy, gco2 in rows:
        if started_at is None:
            continue  # excluded by the query; the column is nullable
        total = sums.setdefault(started_at.strftime("%Y-%m"), [0, 0.0, 0.0])
        total[0] += 1
        total[1] += energy
        total[2] += gco2
    return [
        Month(period=p, runs=int(t[0]), energy_kwh=t[1], gco2=t[2]) for p, t in sorted(sums.items())
    ]
