"""How well runtime estimates hold, per accelerator model, and the correction they earn.

A job's runtime on an offer is estimated from its program (the roofline over
the manifest's flops and bytes, docs/market.md). Every run that finishes puts
a measurement beside that estimate: its metered time. Per model, over the
latest runs, the broker fits ``metered = startup + ratio x estimated``:

- the **ratio** is the median of metered over estimated time of the runs long
  enough for start-up not to matter (``LONG_S``); it corrects the roofline (an
  offer's efficiency is divided by it), so a model whose programs run slower
  than their roofline stops looking cheap, and one that runs faster stops
  looking dear;
- the **start-up** is the median of what the runs took beyond their corrected
  estimate, the transfer of their data and compiling (the agent's measured
  seconds per GB times the program's inputs and results, and per KB times the
  program's size): checking the program, writing, and the requests to the broker. Clearing
  adds it to every program's estimated runtime on that model, which is what
  makes a small job's estimate honest (its work takes microseconds, its run
  half a second).

Both are clamped (``FLOOR``, ``CEILING``, ``MAX_STARTUP_S``): metered time is
what providers report (capped at wall time), so a provider who ran slowly on
purpose could otherwise move every estimate for its model without limit.

Only runs that can speak for the estimate count: jobs whose runtime came from
their program (no ``duration_hours`` stated by the developer), that succeeded
in their first attempt (a resumed run meters only its last part), and whose
estimate and meter are both positive. Estimates made before a model had its
start-up included it as 0; the fit reads the work part of each estimate back
from the allocation (``runtime_hours`` less the start-up it was given).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.market import Allocation, AllocationStatus
from broker.models.offer import Offer
from solver import market as sm

FLOOR = 0.5  # the most a correction may shorten estimates (metered / estimated)
CEILING = 2.0  # the most it may lengthen them
# Emulated offers (demos: a catalog model stood in for by a CPU) run far slower than
# the model they name; their runs form a band of their own, never the real model's,
# and may lengthen their estimates this far.
EMULATED_CEILING = 100.0
MAX_STARTUP_S = 120.0  # the most start-up a model's runs can add to its estimates
# The most an agent's measured transfer may add per GB of a program's data (a disk of
# 10 MB/s); a slower figure is taken as this one.
MAX_TRANSFER_S_PER_GB = 100.0
# The most an agent's measured compile time may add per KB of program (a program of
# 100 KB, a large model's step: a minute at most).
MAX_COMPILE_S_PER_KB = 0.6
LONG_S = 60.0  # runs estimated at least this long speak for the ratio
MIN_RUNS = 5  # runs of a model before its ratio, or its start-up, corrects anything
WINDOW = 200  # the latest runs per model that count
SCANNED = 20_000  # the latest runs read, all models together


@dataclass(frozen=True)
class Band:
    """Metered against estimated runtime for one accelerator model's latest runs."""

    model: str
    runs: int
    median: float  # of metered / estimated, over all the runs
    low: float  # its 10th percentile
    high: float  # its 90th percentile
    long_runs: int = 0  # runs estimated at LONG_S or more
    long_median: float = 1.0  # of metered / estimated, over those
    startup_s: float = 0.0  # median of metered less the corrected estimate, unclamped
    emulated: bool = False  # the runs of emulated offers of the model

    @property
    def correction(self) -> float:
        """What the work part of estimates on this model is multiplied by (1 until
        enough long runs)."""
        if self.long_runs < MIN_RUNS:
            return 1.0
        return min(EMULATED_CEILING if self.emulated else CEILING, max(FLOOR, self.long_median))

    @property
    def startup(self) -> float:
        """Seconds added to every program's estimate on this model (0 until enough runs)."""
        if self.runs < MIN_RUNS:
            return 0.0
        return min(MAX_STARTUP_S, max(0.0, self.startup_s))


def key(model: str, emulated: bool) -> str:
    """The band a run of ``model`` counts in: emulated offers' runs are kept apart."""
    return f"{model} (emulated)" if emulated else model


def bands(session: Session) -> dict[str, Band]:
    """The observed ratio of every model with a run that counts, by ``key``."""
    rows = session.execute(
        select(
            Offer.accelerator,
            Offer.emulated,
            Allocation.usage_ms,
            Allocation.accelerators,
            Allocation.runtime_hours,
            Allocation.startup_seconds,
            Job.io_bytes,
            Offer.transfer_s_per_gb,
            Job.program_bytes,
            Offer.compile_s_per_kb,
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
    # (estimated work, metered less the estimated transfer of the program's data and its
    # compiling), seconds
    runs: dict[str, list[tuple[float, float]]] = {}
    emulated: set[str] = set()
    for row in rows:
        model, is_emulated, usage_ms, accelerators, runtime_hours, startup = row[:6]
        io, per_gb, program, per_kb = row[6:]
        name = key(model, is_emulated)
        if is_emulated:
            emulated.add(name)
        kept = runs.setdefault(name, [])
        if len(kept) < WINDOW:
            transfer = (io or 0.0) / 1e9 * min(per_gb or 0.0, MAX_TRANSFER_S_PER_GB)
            transfer += (program or 0) / 1000 * min(per_kb or 0.0, MAX_COMPILE_S_PER_KB)
            metered = usage_ms / max(1, accelerators) / 1000 - transfer
            work = runtime_hours * 3600 - (startup or 0.0)  # the estimate's overhead is
            if work > 0:  # its start-up and that transfer
                kept.append((work, metered))
    return {
        name: fit(name, values, emulated=name in emulated)
        for name, values in sorted(runs.items())
        if values
    }


def fit(model: str, runs: list[tuple[float, float]], *, emulated: bool = False) -> Band:
    """``metered = startup + ratio x work`` from ``(work, metered)`` seconds of runs."""
    ratios = sorted(metered / work for work, metered in runs)
    long = sorted(metered / work for work, metered in runs if work >= LONG_S)
    band = Band(
        model=model,
        runs=len(runs),
        median=statistics.median(ratios),
        low=_percentile(ratios, 0.1),
        high=_percentile(ratios, 0.9),
        long_runs=len(long),
        long_median=statistics.median(long) if long else 1.0,
        emulated=emulated,
    )
    beyond = [metered - band.correction * work for work, metered in runs]
    return replace(band, startup_s=statistics.median(beyond))


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def corrected(offer: sm.Offer, known: dict[str, Band], *, emulated: bool = False) -> sm.Offer:
    """``offer`` with its efficiency divided by its model's correction, and its
    model's fitted start-up once the model has runs enough (until then, the start-up
    its agent measured, already on the offer). An ``emulated`` offer takes the band
    of its model's emulated runs."""
    band = known.get(key(offer.accelerator, emulated))
    if band is None or band.runs < MIN_RUNS:
        return offer
    return replace(
        offer,
        efficiency=min(1.0, offer.efficiency / band.correction),
        startup_seconds=band.startup,
    )
