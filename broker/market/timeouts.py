"""Runs always end: matches never started, and runs past their time.

``sweep_runs`` (run by the server's sweep loop, after the node sweep) applies the
rules ``docs/market.md`` states:

- a match whose provider has not started it within ``start_timeout_s`` goes back
  to the order book, with the reason (the job keeps its attempts: it never ran);
  its offer gets a strike, and an offer that leaves ``max_unstarted`` matches in a
  row unstarted is suspended: off the book, with a reason its provider sees,
  until the provider withdraws it (and lists it again). A started match clears
  the offer's strikes;
- a run past its job's ``deadline_hours`` (from the run's start, plus a margin)
  fails for good: it can no longer finish in time;
- a run past its offer's ``available_hours`` (from the run's start, plus a margin)
  goes back to the market, to resume from its last checkpoint elsewhere.

The agent enforces the same limits on its own machine (``broker.sandbox``)
a margin earlier, so it normally reports the end first; this sweep covers agents
that cannot (gone quiet, or listed by hand with no agent at all).

Functions take the session and never commit. Rows are locked offer first, then
allocation and job, as everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.db import utcnow
from broker.ledger import end_job, release_offer, requeue
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.market import Allocation, AllocationStatus
from broker.models.offer import Offer, OfferStatus


@dataclass(frozen=True)
class SweepReport:
    unstarted: int = 0  # matches handed back to the book
    suspended: int = 0  # offers suspended
    past_deadline: int = 0  # runs failed
    past_available: int = 0  # runs handed back

    def __bool__(self) -> bool:
        return any((self.unstarted, self.suspended, self.past_deadline, self.past_available))


def sweep_runs(
    session: Session,
    *,
    start_timeout_s: float,
    max_unstarted: int,
    margin_s: float,
    max_attempts: int,
    now: datetime | None = None,
) -> SweepReport:
    """Apply the timeouts; returns what it did."""
    now = now or utcnow()
    unstarted, suspended = _unstarted(session, start_timeout_s, max_unstarted, now)
    deadline, available = _overrun(session, margin_s, max_attempts, now)
    session.flush()
    return SweepReport(unstarted, suspended, deadline, available)


def _lock(session: Session, allocation_id: str) -> tuple[Offer, Allocation, Job] | None:
    allocation = session.get(Allocation, allocation_id)
    if allocation is None:
        return None
    offer = session.scalar(
        select(Offer)
        .where(Offer.id == allocation.offer_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    locked = session.scalar(
        select(Allocation)
        .where(Allocation.id == allocation_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if offer is None or locked is None or locked.status != AllocationStatus.active:
        return None
    job = session.scalar(
        select(Job)
        .where(Job.id == locked.job_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return None if job is None else (offer, locked, job)


def _unstarted(
    session: Session, timeout_s: float, max_unstarted: int, now: datetime
) -> tuple[int, int]:
    cutoff = now - timedelta(seconds=timeout_s)
    ids = session.scalars(
        select(Allocation.id)
        .join(Job, Job.id == Allocation.job_id)
        .where(
            Allocation.status == AllocationStatus.active,
            Job.state == JobState.matched,
            Allocation.created_at < cutoff,
        )
        .order_by(Allocation.offer_id, Allocation.id)
        .limit(1000)
    ).all()
    handed_back = suspended = 0
    for allocation_id in ids:
        rows = _lock(session, allocation_id)
        if rows is None:
            continue
        offer, allocation, job = rows
        if job.state != JobState.matched or allocation.created_at >= cutoff:
            continue  # started (or changed) meanwhile
        reason = f"the provider did not start it within {timeout_s:g} s of the match"
        end_job(session, job, JobState.open, reason)
        job.error = f"matched to offer {offer.id}, but {reason}; back in the order book"
        handed_back += 1
        offer.unstarted_strikes += 1
        if offer.status == OfferStatus.active and offer.unstarted_strikes >= max_unstarted:
            offer.status = OfferStatus.suspended
            offer.suspended_at = offer.updated_at = now
            offer.suspended_reason = (
                f"suspended: {offer.unstarted_strikes} matches in a row were not started "
                f"within {timeout_s:g} s. Check the agent (or start matched jobs through "
                "POST /v1/allocations/{id}/start), then withdraw this offer and list it again"
            )
            session.flush()
            release_offer(session, offer)  # its other unstarted matches go back too
            suspended += 1
    return handed_back, suspended


def _overrun(
    session: Session, margin_s: float, max_attempts: int, now: datetime
) -> tuple[int, int]:
    rows = session.execute(
        select(Allocation.id, Allocation.started_at, Job.deadline_hours, Offer.available_hours)
        .join(Job, Job.id == Allocation.job_id)
        .join(Offer, Offer.id == Allocation.offer_id)
        .where(
            Allocation.status == AllocationStatus.active,
            Job.state == JobState.running,
            Allocation.started_at.is_not(None),
            (Job.deadline_hours.is_not(None)) | (Offer.available_hours.is_not(None)),
        )
        .order_by(Allocation.id)
        .limit(10_000)
    ).all()
    failed = handed_back = 0
    for allocation_id, started_at, deadline, available in rows:
        limits = [(h, kind) for h, kind in ((deadline, "deadline"), (available, "hours")) if h]
        if not limits or started_at is None:
            continue
        hours, kind = min(limits)
        if now < started_at + timedelta(hours=hours, seconds=margin_s):
            continue
        locked = _lock(session, allocation_id)
        if locked is None or locked[2].state != JobState.running:
            continue
        _, _, job = locked
        if kind == "deadline":
            reason = f"the run passed the job's deadline ({hours:g} h from its start)"
            job.error = f"stopped: {reason}"
            end_job(session, job, JobState.failed, reason)
            failed += 1
        else:
            reason = f"the run passed the offer's available hours ({hours:g} h from its start)"
            requeue(session, job, reason, max_attempts)
            handed_back += 1
    return failed, handed_back
