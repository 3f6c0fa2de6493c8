"""Clearing rounds: snapshot the book, solve, apply the matches in one transaction.

A round runs in three steps so that the solve (seconds) holds no locks:

1. **Snapshot** (a read): open jobs and active offers with free accelerators.
2. **Solve**: the pure ``solver`` package, outside any transaction.
3. **Apply** (one write transaction): every match is checked again against the
   rows as they are now, locked (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite
   serialises writers). A job that is no longer open or whose bid changed, or an
   offer that was changed in any way (repriced, withdrawn, its limits edited) or
   no longer has the room, is skipped and counted as ``stale``; its job simply
   waits for the next round. So capacity is never oversold, no job is matched
   twice and none above its current bid, whatever runs at the same time.

Only one round runs at a time per database (``leader``, a lease: ``broker.leases``);
a second caller is told so instead of waiting. The apply step is fenced by the
lease's token, checked in its own transaction: a round whose lease passed to
another process meanwhile (it stalled past the lease's expiry) commits nothing.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from adapters import mig
from broker import leases, ledger
from broker.billing import service as billing
from broker.billing.amounts import with_fee
from broker.config import Settings
from broker.db import new_id, transaction, utcnow
from broker.errors import Conflict
from broker.market import adapt
from broker.market.standing import Standing
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.market import ClearingRound
from broker.models.offer import FractionKind, Offer, OfferStatus
from broker.observability import observe_round
from solver import Market, Result, Warm, solve
from solver.fractions import parse_instance, parse_shares

log = logging.getLogger(__name__)


class RoundInProgress(Conflict):
    code = "round_in_progress"


ROUND_LEASE = "clearing"


@contextmanager
def leader(engine: Engine, seconds: float = 60.0) -> Iterator[int | None]:
    """Try to become the one process clearing this database for up to ``seconds``;
    yields the lease's token (the round's writes are fenced by it), or None."""
    with leases.held(engine, ROUND_LEASE, seconds) as token:
        yield token


# A solve: the market, the time limit, and the last round's hand-over (or None).
Solve = Callable[[Market, float, Warm | None], Result]


def run_round(
    engine: Engine,
    settings: Settings,
    trigger: str = "manual",
    solver: Solve | None = None,
    standing: Standing | None = None,
) -> ClearingRound | None:
    """Clear the market once. Raises RoundInProgress if another round is running.

    An automatic round with nothing to clear (no open job that an offer could
    take, or no free capacity) is not recorded and returns None; a manual one
    always is. ``solver`` runs the solve (default: ``solver.solve`` in this
    thread). ``standing`` is what earlier rounds of this process remember, so
    that this one reads and solves only what changed (``broker.market.standing``).
    """
    with leader(engine, round_lease_seconds(settings)) as token:
        if token is None:
            raise RoundInProgress("a clearing round is already running; try again shortly")
        record = _run(engine, settings, trigger, solver, standing, token)
    if record is not None:
        observe_round(trigger, record.status, record.solve_seconds, record.matched)
    return record


def round_lease_seconds(settings: Settings) -> float:
    """How long a round may hold the clearing lease: its solve three times over, and the
    leases' own margin. A round that overruns it loses nothing but its own matches."""
    return 3 * settings.clear_time_limit_seconds + settings.lease_seconds


def _solve_here(market: Market, time_limit: float, warm: Warm | None = None) -> Result:
    return solve(market, time_limit=time_limit, warm=warm)


class BackgroundSolver:
    """``solver.solve`` in a child process at a lower CPU priority (started on first use,
    and again after it died)."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    def __call__(self, market: Market, time_limit: float, warm: Warm | None = None) -> Result:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_lower_priority,
            )
        try:
            return self._pool.submit(solve, market, time_limit=time_limit, warm=warm).result()
        except BrokenProcessPool:
            self._pool = None
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


# Niceness (added to the server's) of the scheduler process on PostgreSQL
# (broker.periodic), and of its solver: under a full CPU, requests get about three
# times the scheduler's share of a core and thirty times the solver's.
ROUND_NICENESS = 10
_SOLVER_NICENESS = 9


def _lower_priority() -> None:
    import signal

    os.nice(_SOLVER_NICENESS)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the clearing process, not this


def _run(
    engine: Engine,
    settings: Settings,
    trigger: str,
    solver: Solve | None = None,
    standing: Standing | None = None,
    token: int | None = None,
) -> ClearingRound | None:
    """The round itself; ``token``: the clearing lease's, which fences the apply step
    (None only for tests that race rounds on purpose)."""
    _close_interrupted(engine)
    round_id = new_id("rnd")
    started = time.perf_counter()
    with transaction(engine, write=False) as session:
        fee_ppm, _ = billing.current_fee(session, settings)
        weights = adapt.weights(settings, fee_ppm)
        # Any change a provider makes to an offer, or a developer to a job's bid,
        # moves its updated_at; a match computed from an older version is stale.
        book, versions = (standing or Standing()).read(session, weights)
    market = standing.to_solve(book) if standing else book
    read_seconds = time.perf_counter() - started
    if trigger == "auto" and not (market.jobs and market.offers):
        return None
    with transaction(engine) as session:
        session.add(
            ClearingRound(
                id=round_id,
                trigger=trigger,
                status="running",
                jobs_considered=len(book.jobs),
                offers_considered=len(book.offers),
            )
        )
    try:
        warm = standing.warm if standing else None
        result = (solver or _solve_here)(market, settings.clear_time_limit_seconds, warm)
        if standing:
            standing.solved(market, result)
        with transaction(engine) as session:
            if token is not None:
                leases.fence(session, ROUND_LEASE, token)  # first: the lease row, then offers
            matched, stale = _apply(session, round_id, result, versions, settings, fee_ppm)
            record = session.get_one(ClearingRound, round_id)
            record.status = result.status
            record.matched, record.stale = matched, stale
            record.objective, record.bound, record.gap = result.objective, result.bound, result.gap
            record.solve_seconds = result.solve_seconds
            record.finished_at = utcnow()
        log.info(
            "round %s: %d open jobs, %d solved against %d offers; matched %d, stale %d; "
            "read %.2f s, solve %.2f s, in all %.2f s",
            round_id,
            len(book.jobs),
            len(market.jobs),
            len(market.offers),
            matched,
            stale,
            read_seconds,
            result.solve_seconds,
            time.perf_counter() - started,
        )
    except Exception as exc:
        log.exception("clearing round %s failed", round_id)
        with transaction(engine) as session:
            record = session.get_one(ClearingRound, round_id)
            record.status, record.error, record.finished_at = "failed", str(exc)[:2000], utcnow()
    with transaction(engine, write=False) as session:
        return session.get_one(ClearingRound, round_id)


def _close_interrupted(engine: Engine) -> None:
    """Rounds still marked running while this process is the leader died with their
    process (the broker was stopped mid-round). A round writes its matches in one
    transaction, so such a round matched nothing: say so."""
    with transaction(engine) as session:
        for record in session.scalars(
            select(ClearingRound).where(ClearingRound.status == "running").with_for_update()
        ):
            record.status, record.finished_at = "failed", utcnow()
            record.error = "interrupted: the broker stopped during the round; nothing was matched"


def _apply(
    session: Session,
    round_id: str,
    result: Result,
    versions: dict[str, datetime],
    settings: Settings,
    fee_ppm: int,
) -> tuple[int, int]:
    """Create the round's allocations against the rows as they are now."""
    if not result.assignments:
        return 0, 0
    job_ids = sorted({a.job for a in result.assignments})
    offer_ids = sorted({a.offer for a in result.assignments})
    # Lock in a fixed order (offers, then jobs, each by id) so rounds and
    # requests cannot deadlock. Only the columns the checks and prices need.
    offers = {
        o.id: o
        for o in session.execute(
            select(
                Offer.id,
                Offer.status,
                Offer.updated_at,
                Offer.count.label("free"),
                Offer.price_per_hour_micros,
                Offer.region,
                Offer.accelerator,
                Offer.capacity,
                Offer.fraction_kind,
                Offer.shares,
                Offer.mig_instances,
                Offer.mig_busy,
                Offer.device,
            )
            .where(Offer.id.in_(offer_ids))
            .order_by(Offer.id)
            .with_for_update()
        )
    }
    jobs = {
        j.id: j
        for j in session.execute(
            select(
                Job.id,
                Job.state,
                Job.updated_at,
                Job.accelerators,
                Job.budget_micros,
                Job.data_region,
                Job.data_gb,
                Job.fraction_milli,
                Job.mig_profile,
            )
            .where(Job.id.in_(job_ids))
            .order_by(Job.id)
            .with_for_update()
        )
    }
    budgets = billing.budgets_left(session, jobs.values())
    free = {offer_id: o.free for offer_id, o in offers.items()}
    slices = _Slices(session, offers, result.repartitions)
    matches: list[ledger.NewAllocation] = []
    stale = 0
    for a in result.assignments:
        job, offer = jobs.get(a.job), offers.get(a.offer)
        if (
            job is None
            or offer is None
            or job.state != JobState.open
            or job.updated_at != versions.get(job.id)
            or offer.status != OfferStatus.active
            or offer.updated_at != versions.get(offer.id)
            or not _fits_kind(job, offer, a.slice)
        ):
            stale += 1
            continue
        if offer.fraction_kind == FractionKind.whole:
            if free[offer.id] < job.accelerators:
                stale += 1
                continue
            piece = _Piece(None, Fraction(1), job.accelerators)
        else:
            taken = slices.take(offer, a.slice, free[offer.id])
            if taken is None:
                stale += 1
                continue
            piece = taken
        share = piece.share
        compute, egress, latency = adapt.exact_cost(
            job, offer, a.runtime_hours, a.rtt_ms, settings, share
        )
        left = budgets.get(job.id)
        if left is not None and with_fee(Fraction(compute), fee_ppm) > left:
            # The solver's budget rule is in floats; this is the exact check.
            stale += 1
            continue
        matches.append(
            ledger.NewAllocation(
                job_id=job.id,
                job_state=JobState(job.state),
                offer_id=offer.id,
                accelerators=job.accelerators,
                price_per_hour_micros=offer.price_per_hour_micros,
                runtime_hours=a.runtime_hours,
                startup_seconds=a.startup_seconds,
                energy_kwh=a.energy_kwh,
                gco2=a.gco2,
                rtt_ms=a.rtt_ms,
                compute_micros=compute,
                egress_micros=egress,
                latency_micros=latency,
                fee_ppm=fee_ppm,
                slice=piece.slice,
                share_num=share.numerator,
                share_den=share.denominator,
                takes=piece.takes,
            )
        )
        free[offer.id] -= piece.takes
    ledger.allocate(session, round_id, matches, layouts=slices.layouts)
    return len(matches), stale


def _fits_kind(job: Any, offer: Any, slice_: str) -> bool:
    """A fractional job goes to a fractional offer, a whole one to a whole offer or to
    every share of one of a shared offer's accelerators (``solver.clearing``)."""
    fractional = job.fraction_milli is not None or job.mig_profile is not None
    if offer.fraction_kind == FractionKind.whole:
        return not fractional
    if fractional:
        return True
    if offer.fraction_kind != FractionKind.shared or job.accelerators != 1:
        return False
    try:
        k, total, _ = parse_shares(slice_)
    except ValueError:
        return False
    return k == total


@dataclass(frozen=True, slots=True)
class _Piece:
    """What a match takes of its offer: the slice (None: whole accelerators), its
    exact share of one accelerator, and how many of the offer's free ones."""

    slice: str | None
    share: Fraction
    takes: int


class _Slices:
    """The fractional offers' slices as a round's apply step hands them out: a slice
    the solver gave is checked against the offer as it is now (locked), so no MIG
    slot and no share is sold twice."""

    def __init__(self, session: Session, offers: dict[str, Any], layouts: dict[str, Any]) -> None:
        shared = sorted(i for i, o in offers.items() if o.fraction_kind == FractionKind.shared)
        # Each shared offer's accelerators with shares held, and how many shares each.
        self._held = {i: ledger.shared_gpus_held(session, i) for i in shared}
        self._mig_busy: dict[str, list[str]] = {}
        self._round_load: dict[str, dict[int, int]] = {}
        self.layouts: dict[str, tuple[str, ...]] = {}
        for offer_id, layout in layouts.items():
            o = offers.get(offer_id)
            if o is not None and o.fraction_kind == FractionKind.mig and not o.mig_busy:
                self.layouts[offer_id] = tuple(layout)  # idle GPUs only

    def take(self, offer: Any, slice_: str, free: int) -> _Piece | None:
        """The piece ``slice_`` of ``offer``, marked taken; None if it is not free."""
        try:
            share = adapt.share_of(offer.fraction_kind, offer.accelerator, slice_)
        except ValueError:
            return None
        if offer.fraction_kind == FractionKind.mig:
            busy = self._mig_busy.setdefault(offer.id, list(offer.mig_busy))
            profiles = {p.name: p for p in mig.profiles(offer.accelerator)}
            name, start = parse_instance(slice_)
            fixed = offer.device is not None or mig.partitioned_whole(offer.accelerator)
            if fixed and slice_ not in offer.mig_instances:
                return None  # sold as it is cut: only the instances that exist
            slots = profiles[name].slots(start)
            for other in busy:
                other_name, other_start = parse_instance(other)
                if slots & profiles[other_name].slots(other_start):
                    return None
            busy.append(slice_)
            # Free instances over the new one's slots are cut away for it.
            instances = self.layouts.get(offer.id, tuple(offer.mig_instances))
            self.layouts[offer.id] = tuple(
                i
                for i in instances
                if not (profiles[parse_instance(i)[0]].slots(parse_instance(i)[1]) & slots)
            )
            return _Piece(slice_, share, 0)
        k, total, index = parse_shares(slice_)
        held = self._held[offer.id]
        # The solver numbers the accelerators that had a share free when it read the
        # offer (its version is unchanged), in order (``adapt.open_gpus``).
        gpus = adapt.open_gpus(offer.capacity, offer.shares, held)
        if total != offer.shares or index >= len(gpus) or k > total:
            return None
        gpu = gpus[index]
        load = self._round_load.setdefault(offer.id, {})
        if held.get(gpu, 0) + load.get(gpu, 0) + k > total:
            return None
        # A share of an accelerator no match held takes it from the free count.
        new = held.get(gpu, 0) == 0 and gpu not in load
        if new and free < 1:
            return None
        load[gpu] = load.get(gpu, 0) + k
        return _Piece(f"{k}/{total} shared on GPU {gpu}", share, 1 if new else 0)
