"""Allocations: capacity a match holds, and handing it back when the job ends."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from broker.db import utcnow
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.market import Allocation, AllocationStatus
from broker.models.offer import Offer


def active_allocation(session: Session, job_id: str) -> Allocation | None:
    return session.scalar(
        select(Allocation).where(
            Allocation.job_id == job_id, Allocation.status == AllocationStatus.active
        )
    )


def latest_allocation(session: Session, job_id: str) -> Allocation | None:
    return session.scalar(
        select(Allocation)
        .where(Allocation.job_id == job_id)
        .order_by(Allocation.created_at.desc(), Allocation.id.desc())
        .limit(1)
    )


def latest_placements(session: Session, job_ids: list[str]) -> dict[str, tuple[Allocation, Offer]]:
    """Each job's latest allocation and the offer it was matched to (jobs never
    matched are left out): where a job runs or ran, and at what locked ask."""
    if not job_ids:
        return {}
    rows = session.execute(
        select(Allocation, Offer)
        .join(Offer, Offer.id == Allocation.offer_id)
        .where(Allocation.job_id.in_(job_ids))
        .order_by(Allocation.created_at, Allocation.id)
    ).all()
    return {allocation.job_id: (allocation, offer) for allocation, offer in rows}


def release(
    session: Session, job: Job, status: AllocationStatus, reason: str | None = None
) -> Allocation | None:
    """End the job's active allocation and return its accelerators to the offer.

    The offer's count is raised in SQL (``count = count + n``), so concurrent
    releases and clearing rounds never lose an update.
    """
    allocation = active_allocation(session, job.id)
    if allocation is None:
        return None
    allocation.status = status
    allocation.ended_at = utcnow()
    allocation.end_reason = reason
    session.execute(
        update(Offer)
        .where(Offer.id == allocation.offer_id)
        .values(count=Offer.count + allocation.accelerators)
    )
    session.flush()
    return allocation


def end_job(session: Session, job: Job, state: JobState, reason: str | None = None) -> None:
    """Move a job to ``state`` and free its capacity if it no longer needs it
    (cancelled, finished by its provider, or handed back to the book)."""
    job.move_to(state)
    if state in (JobState.succeeded, JobState.failed):
        release(session, job, AllocationStatus.finished, reason)
    elif state in (JobState.cancelled, JobState.open):
        release(session, job, AllocationStatus.released, reason)
    session.flush()


def requeue(session: Session, job: Job, reason: str, max_attempts: int) -> None:
    """Hand a matched or running job back to the order book, because its node was lost,
    stopped, or the run failed in a way another node may not repeat.

    It resumes from its last checkpoint wherever it lands next. A job that has
    been started ``max_attempts`` times fails instead, with the reason.
    """
    if job.state == JobState.running and job.attempts >= max_attempts:
        job.error = f"gave up after {job.attempts} attempts; the last: {reason}"
        end_job(session, job, JobState.failed, reason)
        return
    if job.state == JobState.running:
        job.error = f"attempt {job.attempts} ended: {reason}; back in the order book"
    end_job(session, job, JobState.open, reason)


def release_offer(session: Session, offer: Offer) -> int:
    """Hand matched-but-not-started jobs of a withdrawn offer back to the book."""
    rows = session.execute(
        select(Job, Allocation)
        .join(Allocation, Allocation.job_id == Job.id)
        .where(
            Allocation.offer_id == offer.id,
            Allocation.status == AllocationStatus.active,
            Job.state == JobState.matched,
        )
        .with_for_update()
    ).all()
    for job, _ in rows:
        end_job(session, job, JobState.open, "the offer was withdrawn")
    return len(rows)
