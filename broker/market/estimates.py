"""How well runtime estimates hold, per accelerator model, and the correction they earn.

A job's runtime on an offer is estimated from its program (the roofline over
the manifest's flops and bytes, docs/market.md). Every run that finishes puts
a measurement beside that estimate: its metered accelerator time. Per model,
the median of metered over estimated runtime over the latest runs is the
**observed ratio**; once there are enough runs it corrects later estimates on
offers of that model (their efficiency is divided by it), so that a model
whose programs run slower than their roofline stops looking cheap, and one
that runs faster stops looking dear.

The correction is clamped to ``[FLOOR, CEILING]``: metered time is what
providers report (capped at wall time), so a provider who ran slowly on
purpose could otherwise move every estimate for its model without limit.

Only runs that can speak for the estimate count: jobs whose runtime came from
their program (no ``duration_hours`` stated by the developer), that succeeded
in their first attempt (a resumed run meters only its last part), and whose
estimate and meter are both positive.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.jobs.models import Job
from broker.jobs.states import JobState
from broker.market.models import Allocation, AllocationStatus
from broker.offers.models import Offer
from solver import market as sm

FLOOR = 0.5  # the most a correction may shorten estimates (metered / estimated)
CEILING = 2.0  # the most it may lengthen them
MIN_RUNS = 5  # runs of a model before its ratio corrects anything
WINDOW = 200  # the latest runs per model that count
SCANNED = 20_000  # the latest runs read, all models together
MS_PER_HOUR = 3_600_000


@dataclass(frozen=True)
class Band:
    """Metered over estimated runtime for one accelerator model's latest runs."""

    model: str
    runs: int
    median: float
    low: float  # the 10th percentile
    high: float  # the 90th percentile

    @property
    def correction(self) -> float:
        """What estimates on this model are multiplied by (1 until enough runs)."""
        if self.runs < MIN_RUNS:
            return 1.0
        return min(CEILING, max(FLOOR, self.median))


def bands(session: Session) -> dict[str, Band]:
    """The observed ratio of every model with a run that counts."""
    rows = session.execute(
        select(
            Offer.accelerator,
            Allocation.usage_ms,
            Allocation.accelerators,
            Allocation.runtime_hours,
        )
        .join(Offer, Offer.id == Allocation.offer_id)
        .join(Job, Job.id == Allocation.job_id)
        .where(
            Allocation.status == AllocationStatus.finished,
            Job.state == JobState.succeeded,
            Job.attempts == 1,
            Job.duration_hours.is_(None),
            Allocation.runtime_hours > 0,
            Allocation.usage_ms > 0,
        )
        .order_by(Allocation.ended_at.desc(), Allocation.id)
        .limit(SCANNED)
    ).all()
    ratios: dict[str, list[float]] = {}
    for model, usage_ms, accelerators, runtime_hours in rows:
        kept = ratios.setdefault(model, [])
        if len(kept) < WINDOW:
            metered_hours = usage_ms / max(1, accelerators) / MS_PER_HOUR
            kept.append(metered_hours / runtime_hours)
    return {model: _band(model, values) for model, values in sorted(ratios.items())}


def _band(model: str, values: list[float]) -> Band:
    ordered = sorted(values)
    return Band(
        model=model,
        runs=len(ordered),
        median=statistics.median(ordered),
        low=_percentile(ordered, 0.1),
        high=_percentile(ordered, 0.9),
    )


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def corrected(offer: sm.Offer, known: dict[str, Band]) -> sm.Offer:
    """``offer`` with its efficiency divided by its model's correction."""
    band = known.get(offer.accelerator)
    if band is None or band.correction == 1.0:
        return offer
    return replace(offer, efficiency=min(1.0, offer.efficiency / band.correction))
