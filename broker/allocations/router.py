"""The provider's side of a match: pick up work, report progress, checkpoints and results."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from broker.accounts.callers import Agent
from broker.allocations import service
from broker.allocations.schemas import (
    CheckpointIn,
    Finish,
    Progress,
    ProviderAllocation,
    RunOut,
    WorkQuery,
)
from broker.auth import AgentDep, StreamingAgent
from broker.billing import service as billing
from broker.config import get_settings
from broker.db import SessionDep, Transactions, TransactionsDep
from broker.ledger import slice_memory_gib
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.market import Allocation
from broker.models.offer import FractionKind, Offer
from broker.types import ObjectId

router = APIRouter(prefix="/v1/allocations", tags=["allocations"])

_POLL_SECONDS = 0.5


def provider_allocation(
    session: Session, allocation: Allocation, offer: Offer, job: Job
) -> ProviderAllocation:
    cap_ms = billing.usage_cap_ms(session, allocation, job)
    return ProviderAllocation(
        allocation_id=allocation.id,
        status=allocation.status,
        job_id=job.id,
        job_state=JobState(job.state),
        offer_id=offer.id,
        accelerator=offer.accelerator,
        platform=offer.platform,
        emulated=offer.emulated,
        accelerators=allocation.accelerators,
        artifact=job.artifact_sha256,
        inputs=job.inputs_sha256,
        steps=job.steps,
        checkpoint_every=job.checkpoint_every,
        checkpoint=job.checkpoint_sha256,
        checkpoint_step=job.checkpoint_step,
        steps_done=job.steps_done,
        usage_limit_seconds=None if cap_ms is None else cap_ms / 1000,
        deadline_hours=job.deadline_hours,
        available_hours=offer.available_hours,
        min_memory_gib=job.min_memory_gib,
        memory_gib=offer.memory_gib,
        kind=FractionKind(offer.fraction_kind),
        slice=allocation.slice,
        share=allocation.share_num / allocation.share_den,
        slice_memory_gib=slice_memory_gib(offer, allocation.slice),
        device=offer.device,
        service_id=job.service_id,
        relay=(get_settings().relay_public_url or None) if job.service_id else None,
        created_at=allocation.created_at,
    )


def _work(transactions: Transactions, agent: Agent) -> list[ProviderAllocation]:
    with transactions(write=False) as session:
        return [provider_allocation(session, *row) for row in service.work_for(session, agent)]


@router.get(
    "",
    summary="My work: active allocations on my node or offers (agent, provider)",
    description="Jobs the market matched to the caller's offers, oldest first: those to "
    "start (`job_state` matched) and those running. A node key sees its node's work only. "
    "With `wait`, the call waits up to that many seconds for work to appear before "
    "answering with an empty list.",
)
async def list_work(
    transactions: TransactionsDep, agent: StreamingAgent, query: Annotated[WorkQuery, Query()]
) -> list[ProviderAllocation]:
    deadline = time.monotonic() + query.wait
    while True:
        orders = await run_in_threadpool(_work, transactions, agent)
        if orders or time.monotonic() >= deadline:
            return orders
        await asyncio.sleep(min(_POLL_SECONDS, max(0.0, deadline - time.monotonic())))


@router.post("/{allocation_id}/start", summary="Start a matched job (provider)")
def start(session: SessionDep, agent: AgentDep, allocation_id: ObjectId) -> ProviderAllocation:
    return provider_allocation(session, *service.start(session, agent, allocation_id))


def run_out(session: Session, allocation_id: str, job: Job) -> RunOut:
    """The provider's view of the job after a report (the allocation is in the session
    already: no query)."""
    allocation = session.get_one(Allocation, allocation_id)
    return RunOut(
        allocation_id=allocation.id,
        status=allocation.status,
        job_id=job.id,
        state=JobState(job.state),
        steps=job.steps,
        steps_done=job.steps_done,
        checkpoint=job.checkpoint_sha256,
        checkpoint_step=job.checkpoint_step,
        result=job.result_sha256,
        error=job.error,
        accelerator_seconds=allocation.usage_ms / 1000,
    )


@router.post("/{allocation_id}/progress", summary="Report steps done (provider)")
def progress(
    session: SessionDep, agent: AgentDep, allocation_id: ObjectId, body: Progress
) -> RunOut:
    job = service.progress(
        session, agent, allocation_id, body.steps_done, body.accelerator_seconds, body.log
    )
    return run_out(session, allocation_id, job)


@router.post(
    "/{allocation_id}/checkpoint",
    summary="Record a checkpoint (provider)",
    description="The checkpoint must be an array bundle this node (or, for an offer listed "
    "by hand, the provider's own key) uploaded since the job was matched to it.",
)
def checkpoint(
    session: SessionDep, agent: AgentDep, allocation_id: ObjectId, body: CheckpointIn
) -> RunOut:
    job = service.checkpoint(session, agent, allocation_id, body.checkpoint, body.step)
    return run_out(session, allocation_id, job)


@router.post(
    "/{allocation_id}/finish",
    summary="Finish a job: result or error (provider)",
    description="A result must be an array bundle this node (or, for an offer listed by "
    "hand, the provider's own key) uploaded since the job was matched to it.",
)
def finish(session: SessionDep, agent: AgentDep, allocation_id: ObjectId, body: Finish) -> RunOut:
    job = service.finish(
        session,
        agent,
        allocation_id,
        body.outcome,
        body.result,
        body.error,
        retry=body.retry,
        accelerator_seconds=body.accelerator_seconds,
        max_attempts=get_settings().max_attempts,
        log=body.log,
        energy_kwh=body.energy_kwh,
    )
    return run_out(session, allocation_id, job)
