"""Running matched jobs: the provider side of an allocation's life.

The provider whose offer holds an allocation starts the job, reports progress,
usage and checkpoints, and finishes it with a result or an error. Only that
provider may, and for an offer its agent published, only that node's agent
(the node key); once the allocation has ended (the developer cancelled, or the job was
handed back to the market) every report is refused, so the provider stops.
Functions take the session and never commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters import grid
from broker import ledger
from broker.accounts.callers import Agent
from broker.accounts.visibility import own_rows, sees_all
from broker.allocations import logs
from broker.billing import service as billing
from broker.blobs.service import get_blob, grant, leaf_specs, uploaded_since
from broker.db import utcnow
from broker.errors import Conflict, Forbidden, InvalidInput, NotFound
from broker.ledger import end_job, requeue
from broker.models.blob import Blob, BlobKind
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.market import Allocation, AllocationStatus
from broker.models.offer import Offer
from broker.portable.arrays import LeafSpec
from broker.portable.manifest import Manifest, TensorSpec

_RUN_FAILED = "the run failed: "


class AllocationEnded(Conflict):
    code = "allocation_ended"


def work_for(session: Session, agent: Agent) -> list[tuple[Allocation, Offer, Job]]:
    """Active allocations on the agent's node (or, for a provider's own key, on all its
    offers), oldest first."""
    stmt = (
        select(Allocation, Offer, Job)
        .join(Offer, Offer.id == Allocation.offer_id)
        .join(Job, Job.id == Allocation.job_id)
        .where(Allocation.status == AllocationStatus.active)
        .order_by(Allocation.created_at, Allocation.id)
        .limit(1000)
    )
    if agent.node_id is not None:
        stmt = stmt.where(Offer.node_id == agent.node_id)
    else:
        stmt = stmt.where(*own_rows(agent.account, Offer.provider_id))
    return [(a, o, j) for a, o, j in session.execute(stmt).all()]


def get_allocation(
    session: Session, agent: Agent, allocation_id: str, *, lock: bool = False
) -> tuple[Allocation, Offer, Job]:
    """One of the agent's allocations; with ``lock``, its offer and job rows are
    locked, offer first, as everywhere else.

    A node's allocations answer only to that node's key: another node of the same
    provider gets 404, and the provider's own key is told to use the node's.
    """
    allocation = session.get(Allocation, allocation_id)
    offer = session.get(Offer, allocation.offer_id) if allocation else None
    if allocation is None or offer is None:
        raise NotFound(f"no allocation {allocation_id!r} on your offers")
    admin = sees_all(agent.account)
    if agent.node_id is not None and offer.node_id != agent.node_id:
        raise NotFound(f"no allocation {allocation_id!r} on this node")
    if not admin and offer.provider_id != agent.account.id:
        raise NotFound(f"no allocation {allocation_id!r} on your offers")
    if agent.node_id is None and offer.node_id is not None and not admin:
        raise Forbidden(
            f"allocation {allocation_id} runs on node {offer.node_id}: only that node's agent "
            "(its node key) may report on it",
        )
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


def start(session: Session, agent: Agent, allocation_id: str) -> tuple[Allocation, Offer, Job]:
    """Mark the job running. Starting again (a retried request) changes nothing."""
    allocation, offer, job = get_allocation(session, agent, allocation_id, lock=True)
    _active(allocation)
    ledger.start(session, job, allocation, offer)
    return allocation, offer, job


def meter(
    session: Session,
    allocation: Allocation,
    job: Job,
    accelerator_seconds: float | None,
    now: datetime | None = None,
) -> bool:
    """Record the running total of accelerator-seconds the provider reports for an
    allocation (rows locked by the caller); returns whether the job has now used
    up its budget.

    Totals only grow, so a replayed or late report changes nothing. A total is
    capped at the wall time since the start times the accelerators held, so a
    provider cannot bill for more than it could have run, and at what the job's
    budget still buys, so a developer never pays past the budget.

    A fractional allocation meters at its share: its accelerator-seconds are the
    seconds it ran times its share of one accelerator (``share_num / share_den``),
    so every bill of it is the usage at the locked ask, as for whole ones.
    """
    if accelerator_seconds is None or allocation.started_at is None:
        return False
    wall = ((now or utcnow()) - allocation.started_at).total_seconds()
    cap_ms = (
        max(0, int(wall * 1000))
        * allocation.accelerators
        * allocation.share_num
        // allocation.share_den
    )
    budget_ms = billing.usage_cap_ms(session, allocation, job)
    if budget_ms is not None:
        cap_ms = min(cap_ms, budget_ms)
    total_ms = min(round(accelerator_seconds * 1000), cap_ms)
    if total_ms > allocation.usage_ms:
        job.usage_ms += total_ms - allocation.usage_ms
        allocation.usage_ms = total_ms
    return budget_ms is not None and allocation.usage_ms >= budget_ms


def progress(
    session: Session,
    agent: Agent,
    allocation_id: str,
    steps_done: int,
    accelerator_seconds: float | None = None,
    log: Sequence[logs.Line] = (),
) -> Job:
    allocation, _, job = get_allocation(session, agent, allocation_id, lock=True)
    _active(allocation)
    _running(job)
    logs.append(session, allocation, log)
    if meter(session, allocation, job, accelerator_seconds):
        billing.stop_at_budget(session, job)
        return job
    limit = job.steps or 1
    if steps_done > limit:
        raise InvalidInput(f"the job has {limit} steps", field="body.steps_done")
    if steps_done > job.steps_done:  # reports may arrive out of order
        job.steps_done = steps_done
        job.updated_at = utcnow()
    return job


def checkpoint(session: Session, agent: Agent, allocation_id: str, sha256: str, step: int) -> Job:
    """Record the job's state after ``step`` steps, so that it can resume from there on
    any provider. The same checkpoint again is a no-op; an older one is refused."""
    allocation, _, job = get_allocation(session, agent, allocation_id, lock=True)
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
    blob = _uploaded(session, agent, allocation, sha256, "body.checkpoint")
    _fits(leaf_specs(blob), manifest.inputs[: manifest.state_leaves], "checkpoint")
    job.checkpoint_sha256, job.checkpoint_step = sha256, step
    job.steps_done = max(job.steps_done, step)
    job.updated_at = utcnow()
    grant(session, sha256, job.account_id)
    return job


def finish(
    session: Session,
    agent: Agent,
    allocation_id: str,
    outcome: str,
    result: str | None,
    error: str | None,
    *,
    retry: bool = False,
    accelerator_seconds: float | None = None,
    max_attempts: int = 1,
    log: Sequence[logs.Line] = (),
    energy_kwh: float | None = None,
) -> Job:
    """End the run with its result (succeeded) or the reason (failed), and free the
    capacity. A failure the provider marks ``retry`` (the machine, not the program)
    hands the job back to the market until it has had ``max_attempts`` starts.
    A retried report of the same outcome changes nothing."""
    allocation, offer, job = get_allocation(session, agent, allocation_id, lock=True)
    state = JobState(outcome)
    if allocation.status != AllocationStatus.active and _reported(allocation, job, state, result):
        return job
    _active(allocation)
    if job.state == JobState.matched:
        raise Conflict("start the job before finishing it", field="body.outcome")
    logs.append(session, allocation, log)
    over_budget = meter(session, allocation, job, accelerator_seconds)
    if energy_kwh is not None:
        _measured(allocation, offer, energy_kwh)
    if state == JobState.failed and over_budget:
        billing.stop_at_budget(session, job)
        return job
    if state == JobState.succeeded:
        manifest = _manifest(session, job)
        if manifest is not None:
            if result is None:
                raise InvalidInput("a succeeded job needs its result", field="body.result")
            blob = _uploaded(session, agent, allocation, result, "body.result")
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
        reason = error or "the provider reported a failure without a reason"
        if retry:
            requeue(session, job, f"{_RUN_FAILED}{reason}", max_attempts)
            return job
        job.error = reason
        end_job(session, job, state, f"{_RUN_FAILED}{reason}")
        return job
    end_job(session, job, state)
    return job


# The most one accelerator can draw, for checking what agents report: about twice
# today's largest datasheet figures (1.2 kW for a Blackwell GPU), for the readings'
# own error and a short run's last sample.
MAX_KW_PER_ACCELERATOR = 2.5


def _measured(allocation: Allocation, offer: Offer, energy_kwh: float) -> None:
    """Record the energy the agent measured: at the wall (times the site's PUE) and its
    emissions (times the grid's intensity), with the offer's stated figures or the
    defaults, as clearing counts them (docs/market.md)."""
    hours = allocation.usage_ms / 3_600_000  # accelerator-hours metered
    most = MAX_KW_PER_ACCELERATOR * hours + 0.001
    if energy_kwh > most:
        raise InvalidInput(
            f"energy_kwh {energy_kwh:g} is more than {allocation.accelerators} accelerator(s) "
            f"can draw in the {hours:.4f} accelerator-hours metered (at most {most:.4f} kWh at "
            f"{MAX_KW_PER_ACCELERATOR} kW each); report the devices' energy in kWh",
            field="body.energy_kwh",
        )
    figures = grid.offer_energy(
        offer.vendor,
        offer.accelerator,
        offer.country,
        offer.region,
        power_w=offer.power_w,
        pue=offer.pue,
        grid_g_per_kwh=offer.grid_g_per_kwh,
    )
    allocation.measured_kwh = energy_kwh * figures["pue"]
    allocation.measured_gco2 = allocation.measured_kwh * figures["grid_g_per_kwh"]


def _reported(allocation: Allocation, job: Job, state: JobState, result: str | None) -> bool:
    """Whether this allocation already ended with this outcome (a retried report)."""
    if state == JobState.succeeded:
        return job.state == state and job.result_sha256 == result
    # A failure ends the allocation whether the job failed or went back to the book;
    # a job the broker itself failed meanwhile (its budget ran out) ended the same way.
    return (allocation.end_reason or "").startswith(_RUN_FAILED) or job.state == JobState.failed


def _running(job: Job) -> None:
    if job.state != JobState.running:
        raise Conflict(f"job {job.id} is {job.state.value}, not running")


def _manifest(session: Session, job: Job) -> Manifest | None:
    if job.artifact_sha256 is None:
        return None
    blob = session.get(Blob, job.artifact_sha256)
    assert blob is not None  # a foreign key
    return Manifest.model_validate(blob.meta)


def _uploaded(
    session: Session, agent: Agent, allocation: Allocation, sha256: str, field: str
) -> Blob:
    """An array bundle the reporting node (or the provider's own key, for an offer listed
    by hand) uploaded since the allocation was made: never another node's upload, nor
    anything else the provider may read, which the developer would then be given."""
    try:
        if sees_all(agent.account) and agent.node_id is None:
            return get_blob(session, agent.account, sha256, BlobKind.arrays)
        return uploaded_since(
            session, agent.account, agent.node_id, sha256, BlobKind.arrays, allocation.created_at
        )
    except NotFound:
        who = f"node {agent.node_id}" if agent.node_id else "your own key"
        raise InvalidInput(
            f"no array bundle {sha256} uploaded by {who} for allocation {allocation.id}: "
            "upload it to /v1/arrays first",
            field=field,
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
