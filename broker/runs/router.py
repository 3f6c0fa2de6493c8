"""The provider's side of a match: pick up work, report progress, checkpoints and results."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from broker.accounts.models import Account
from broker.auth import Provider, StreamingProvider
from broker.db import SessionDep, Transactions, TransactionsDep
from broker.jobs.models import Job
from broker.jobs.router import job_out
from broker.jobs.schemas import JobOut
from broker.jobs.states import JobState
from broker.market.models import Allocation
from broker.offers.models import Offer
from broker.runs import service
from broker.runs.schemas import CheckpointIn, Finish, Progress, WorkOrder, WorkQuery
from broker.types import ObjectId

router = APIRouter(prefix="/v1/allocations", tags=["runs"])

_POLL_SECONDS = 0.5


def work_order(allocation: Allocation, offer: Offer, job: Job) -> WorkOrder:
    return WorkOrder(
        allocation_id=allocation.id,
        status=allocation.status,
        job_id=job.id,
        job_state=JobState(job.state),
        offer_id=offer.id,
        platform=offer.platform,
        accelerators=allocation.accelerators,
        artifact=job.artifact_sha256,
        inputs=job.inputs_sha256,
        steps=job.steps,
        checkpoint_every=job.checkpoint_every,
        checkpoint=job.checkpoint_sha256,
        checkpoint_step=job.checkpoint_step,
        steps_done=job.steps_done,
        created_at=allocation.created_at,
    )


def _work(transactions: Transactions, provider: Account) -> list[WorkOrder]:
    with transactions(write=False) as session:
        return [work_order(*row) for row in service.work_for(session, provider)]


@router.get(
    "",
    summary="My work: active allocations on my offers (provider)",
    description="Jobs the market matched to the caller's offers, oldest first: those to "
    "start (`job_state` matched) and those running. With `wait`, the call waits up to that "
    "many seconds for work to appear before answering with an empty list.",
)
async def list_work(
    transactions: TransactionsDep, provider: StreamingProvider, query: Annotated[WorkQuery, Query()]
) -> list[WorkOrder]:
    deadline = time.monotonic() + query.wait
    while True:
        orders = await run_in_threadpool(_work, transactions, provider)
        if orders or time.monotonic() >= deadline:
            return orders
        await asyncio.sleep(min(_POLL_SECONDS, max(0.0, deadline - time.monotonic())))


@router.post("/{allocation_id}/start", summary="Start a matched job (provider)")
def start(session: SessionDep, provider: Provider, allocation_id: ObjectId) -> WorkOrder:
    return work_order(*service.start(session, provider, allocation_id))


@router.post("/{allocation_id}/progress", summary="Report steps done (provider)")
def progress(
    session: SessionDep, provider: Provider, allocation_id: ObjectId, body: Progress
) -> JobOut:
    return job_out(service.progress(session, provider, allocation_id, body.steps_done))


@router.post("/{allocation_id}/checkpoint", summary="Record a checkpoint (provider)")
def checkpoint(
    session: SessionDep, provider: Provider, allocation_id: ObjectId, body: CheckpointIn
) -> JobOut:
    return job_out(service.checkpoint(session, provider, allocation_id, body.checkpoint, body.step))


@router.post("/{allocation_id}/finish", summary="Finish a job: result or error (provider)")
def finish(
    session: SessionDep, provider: Provider, allocation_id: ObjectId, body: Finish
) -> JobOut:
    job = service.finish(session, provider, allocation_id, body.outcome, body.result, body.error)
    return job_out(job)
