"""Running matched jobs: the provider side of an allocation's life.

The provider whose offer holds an allocation starts the job, reports progress
and checkpoints, and finishes it with a result or an error. Only that provider
may; once the allocation has ended (the developer cancelled, or the job was
handed back to the market) every report is refused, so the provider stops.
Functions take the session and never commit.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.accounts.models import Account, Role
from broker.blobs.models import Blob, BlobKind
from broker.blobs.service import get_blob, grant, leaf_specs
from broker.db import utcnow
from broker.errors import Conflict, InvalidInput, NotFound
from broker.jobs.models import Job
from broker.jobs.states import JobState
from broker.market.allocations import end_job
from broker.market.models import Allocation, AllocationStatus
from broker.offers.models import Offer
from broker.portable.arrays import LeafSpec
from broker.portable.manifest import Manifest, TensorSpec


class AllocationEnded(Conflict):
    code = "allocation_ended"


def work_for(session: Session, provider: Account) -> list[tuple[Allocation, Offer, Job]]:
    """Active allocations on the provider's offers, oldest first."""
    stmt = (
        select(Allocation, Offer, Job)
        .join(Offer, Offer.id == Allocation.offer_id)
        .join(Job, Job.id == Allocation.job_id)
        .where(Allocation.status == AllocationStatus.active)
        .order_by(Allocation.created_at, Allocation.id)
        .limit(1000)
    )
    if provider.role != Role.admin:
        stmt = stmt.where(Offer.provider_id == provider.id)
    return [(a, o, j) for a, o, j in session.execute(stmt).all()]


def get_allocation(
    session: Session, provider: Account, allocation_id: str, *, lock: bool = False
) -> tuple[Allocation, Offer, Job]:
    """One of the provider's allocations; with ``lock``, its offer and job rows are
    locked, offer first, as everywhere else."""
    allocation = session.get(Allocation, allocation_id)
    offer = session.get(Offer, allocation.offer_id) if allocation else None
    if allocation is None or offer is None:
        raise NotFound(f"no allocation {allocation_id!r} on your offers")
    if provider.role != Role.admin and offer.provider_id != provider.id:
        raise NotFound(f"no allocation {allocation_id!r} on your offers")
    if lock:
        session.scalar(
            select(Offer)
            .where(Offer.id == offer.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        session.scalar(
            select(Allocation)
            .where(Allocation.id == allocation.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    stmt = select(Job).where(Job.id == allocation.job_id)
    if lock:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    job = session.scalar(stmt)
    assert job is not None  # a foreign key
    return allocation, offer, job


def _active(allocation: Allocation) -> None:
    if allocation.status != AllocationStatus.active:
        raise AllocationEnded(
            f"allocation {allocation.id} has ended ({allocation.status.value}): the job was "
            "cancelled or went back to the market; stop running it"
        )


def start(session: Session, provider: Account, allocation_id: str) -> tuple[Allocation, Offer, Job]:
    """Mark the job running. Starting again (a retried request) changes nothing."""
    allocation, offer, job = get_allocation(session, provider, allocation_id, lock=True)
    _active(allocation)
    if job.state == JobState.matched:
        job.move_to(JobState.running)
        job.attempts += 1
        job.started_at = job.updated_at
        job.error = None
        session.flush()
    return allocation, offer, job


def progress(session: Session, provider: Account, allocation_id: str, steps_done: int) -> Job:
    allocation, _, job = get_allocation(session, provider, allocation_id, lock=True)
    _active(allocation)
    _running(job)
    limit = job.steps or 1
    if steps_done > limit:
        raise InvalidInput(f"the job has {limit} steps", field="body.steps_done")
    if steps_done > job.steps_done:  # reports may arrive out of order
        job.steps_done = steps_done
        job.updated_at = utcnow()
    return job


def checkpoint(
    session: Session, provider: Account, allocation_id: str, sha256: str, step: int
) -> Job:
    """Record the job's state after ``step`` steps, so that it can resume from there on
    any provider. The same checkpoint again is a no-op; an older one is refused."""
    allocation, _, job = get_allocation(session, provider, allocation_id, lock=True)
    _active(allocation)
    _running(job)
    manifest = _manifest(session, job)
    if manifest is None or manifest.kind != "iterative":
        raise InvalidInput("only iterative jobs have checkpoints", field="body.checkpoint")
    if step == job.checkpoint_step and sha256 == job.checkpoint_sha256:
        return job
    if step <= job.checkpoint_step or step >= (job.steps or 1):
        raise InvalidInput(
            f"step must be after the saved checkpoint ({job.checkpoint_step}) and before the "
            f"last step ({job.steps})",
            field="body.step",
        )
    blob = _uploaded(session, provider, sha256, "body.checkpoint")
    _fits(leaf_specs(blob), manifest.inputs[: manifest.state_leaves], "checkpoint")
    job.checkpoint_sha256, job.checkpoint_step = sha256, step
    job.steps_done = max(job.steps_done, step)
    job.updated_at = utcnow()
    grant(session, sha256, job.account_id)
    return job


def finish(
    session: Session,
    provider: Account,
    allocation_id: str,
    outcome: str,
    result: str | None,
    error: str | None,
) -> Job:
    """End the job with its result (succeeded) or the reason (failed), and free the
    capacity. A retried report of the same outcome changes nothing."""
    allocation, _, job = get_allocation(session, provider, allocation_id, lock=True)
    state = JobState(outcome)
    replayed = allocation.status == AllocationStatus.finished and job.state == state
    if replayed and (state == JobState.failed or job.result_sha256 == result):
        return job
    _active(allocation)
    if job.state == JobState.matched:
        raise Conflict("start the job before finishing it", field="body.outcome")
    if state == JobState.succeeded:
        manifest = _manifest(session, job)
        if manifest is not None:
            if result is None:
                raise InvalidInput("a succeeded job needs its result", field="body.result")
            blob = _uploaded(session, provider, result, "body.result")
            expected = (
                manifest.inputs[: manifest.state_leaves]
                if manifest.kind == "iterative"
                else manifest.outputs
            )
            _fits(leaf_specs(blob), expected, "result")
            grant(session, result, job.account_id)
            job.result_sha256 = result
        job.steps_done = job.steps or 1
        job.error = None
    else:
        job.error = error or "the provider reported a failure without a reason"
    end_job(session, job, state)
    return job


def _running(job: Job) -> None:
    if job.state != JobState.running:
        raise Conflict(f"job {job.id} is {job.state.value}, not running")


def _manifest(session: Session, job: Job) -> Manifest | None:
    if job.artifact_sha256 is None:
        return None
    blob = session.get(Blob, job.artifact_sha256)
    assert blob is not None  # a foreign key
    return Manifest.model_validate(blob.meta)


def _uploaded(session: Session, provider: Account, sha256: str, field: str) -> Blob:
    try:
        return get_blob(session, provider, sha256, BlobKind.arrays)
    except NotFound:
        raise InvalidInput(
            f"no array bundle {sha256} of yours: upload it to /v1/arrays first", field=field
        ) from None


def _fits(leaves: Sequence[LeafSpec], specs: Sequence[TensorSpec], what: str) -> None:
    """The leaves have the specs' dtypes and shapes (a symbolic dimension fits any size)."""
    if len(leaves) != len(specs):
        raise InvalidInput(
            f"the {what} must hold {len(specs)} arrays; it holds {len(leaves)}",
            field=f"body.{what}",
        )
    for i, (leaf, spec) in enumerate(zip(leaves, specs, strict=True)):
        fits = leaf.dtype == spec.dtype and len(leaf.shape) == len(spec.shape)
        fits = fits and all(
            isinstance(d, str) or d == n for d, n in zip(spec.shape, leaf.shape, strict=True)
        )
        if not fits:
            raise InvalidInput(
                f"{what} array {i} must be {spec.dtype}{spec.shape}; "
                f"got {leaf.dtype}{list(leaf.shape)}",
                field=f"body.{what}",
            )
