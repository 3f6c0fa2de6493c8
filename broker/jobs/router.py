from __future__ import annotations

import json
import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from broker.auth import BATCHED_DEVELOPER, BatchedDeveloper, CurrentAccount, bearer_key
from broker.billing import service as billing
from broker.billing.amounts import ppm_to_percent
from broker.config import get_settings
from broker.db import SessionDep, Transactions, TransactionsDep, request_transactions
from broker.jobs import intake, service
from broker.jobs.schemas import JobCreate, JobDetail, JobOut, JobQuery, RunOut
from broker.ledger import latest_allocation
from broker.market.explain import unmatched
from broker.market.schemas import AllocationOut, EstimatedCost
from broker.models.account import Account
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.market import Allocation
from broker.money import micros_to_usd
from broker.pagination import Page
from broker.shortcuts import shortcut_route
from broker.types import ObjectId

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Any unique string (a UUID is good). A retried POST with the same key "
        "returns the job the first one created instead of creating a second.",
    ),
]


def job_out(session: Session, job: Job) -> JobOut:
    return job_outs(session, [job])[0]


def job_outs(session: Session, jobs: Sequence[Job]) -> list[JobOut]:
    """Jobs as the API shows them, with their costs (one query for all of them)."""
    costs = billing.job_costs(session, [j.id for j in jobs])
    return [_job_out(j, costs[j.id]) for j in jobs]


_UNMATCHED = billing.JobCost(
    price_per_hour_micros=None, fee_ppm=None, estimated_micros=None, metered_micros=0
)


def _usd(micros: int | None) -> Decimal | None:
    return None if micros is None else micros_to_usd(micros)


def _job_out(job: Job, cost: billing.JobCost) -> JobOut:
    return JobOut(
        id=job.id,
        account_id=job.account_id,
        name=job.name,
        state=JobState(job.state),
        accelerators=job.accelerators,
        min_memory_gib=job.min_memory_gib,
        vendors=job.vendors,
        accelerator_models=job.accelerator_models,
        platforms=job.platforms,
        max_price_per_hour=micros_to_usd(job.max_price_per_hour_micros),
        budget_usd=_usd(job.budget_micros),
        price_per_hour=_usd(cost.price_per_hour_micros),
        fee_percent=None if cost.fee_ppm is None else ppm_to_percent(cost.fee_ppm),
        estimated_cost_usd=_usd(cost.estimated_micros),
        cost_usd=micros_to_usd(cost.metered_micros),
        duration_hours=job.duration_hours,
        flops=job.flops,
        bytes=job.bytes,
        dtype=job.dtype,
        deadline_hours=job.deadline_hours,
        max_gco2=job.max_gco2,
        carbon_usd_per_t=job.carbon_usd_per_t,
        latency_slo_ms=job.latency_slo_ms,
        user_lat=job.user_lat,
        user_lon=job.user_lon,
        data_region=job.data_region,
        data_gb=job.data_gb,
        allowed_countries=job.allowed_countries,
        priority=job.priority,
        artifact=job.artifact_sha256,
        inputs=job.inputs_sha256,
        steps=job.steps,
        checkpoint_every=job.checkpoint_every,
        steps_done=job.steps_done,
        checkpoint=job.checkpoint_sha256,
        checkpoint_step=job.checkpoint_step,
        result=job.result_sha256,
        attempts=job.attempts,
        accelerator_seconds=job.usage_ms / 1000,
        error=job.error,
        started_at=job.started_at,
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
    )


async def submit_job(
    transactions: TransactionsDep,
    developer: BatchedDeveloper,
    body: JobCreate,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    # The busiest write: the key check and the insert are each batched with other
    # requests' (group commit, broker.jobs.intake); the answer comes once stored.
    # Most requests take _submit_shortcut's shorter way to the same place.
    job = await intake.submit(transactions, developer, body, idempotency_key)
    if job is not None:
        return _job_out(job, _UNMATCHED)  # a new job has no match to look up
    response.status_code = 200
    response.headers[_REPLAYED] = "true"
    return await run_in_threadpool(_replay, transactions, developer, body, idempotency_key)


_REPLAYED = "Idempotent-Replayed"


def _replay(
    transactions: Transactions,
    developer: Account,
    body: JobCreate,
    idempotency_key: str | None,
) -> JobOut:
    """A retry: the job its idempotency key made (or why it cannot be given)."""
    with transactions(write=True) as session:
        job, created = service.submit_job(session, developer, body, idempotency_key)
        if created:  # the key's job is not there (nothing is deleted: should not happen)
            return _job_out(job, _UNMATCHED)
        return job_out(session, job)


async def _submit_shortcut(request: Request) -> Response | None:
    """``POST /v1/jobs`` without FastAPI's per-request work (``broker.shortcuts``): a
    submission with a bearer key, a valid ``Idempotency-Key`` and a JSON body that is
    a valid ``JobCreate`` goes straight to the group commit, and its ``JobOut`` is
    sent as JSON, as FastAPI would send it. None for anything else."""
    data = await _well_formed(request)
    if data is None:
        return None
    key, body, idempotency_key = data
    transactions = await request_transactions(request)
    developer, job = await intake.submit_with_key(
        transactions, key, body, idempotency_key, BATCHED_DEVELOPER.admit_key
    )
    request.state.account_id = developer.id  # for the access log (never the key)
    if job is not None:
        return _json(_job_out(job, _UNMATCHED), 201)
    out = await run_in_threadpool(_replay, transactions, developer, body, idempotency_key)
    return _json(out, 200, {_REPLAYED: "true"})


_KEY_HEADER = re.compile(r"[\x21-\x7e]{1,255}")  # as IdempotencyKey declares it


async def _well_formed(request: Request) -> tuple[str, JobCreate, str | None] | None:
    """The API key, body and idempotency key of a submission that FastAPI would
    accept but for the key's check, or None: FastAPI's handler answers."""
    key = await bearer_key(request)
    if key is None:
        return None
    headers = request.headers
    content_type = headers.get("content-type")
    if content_type is None or content_type.partition(";")[0].strip().lower() != "application/json":
        return None
    idempotency_key = headers.get("idempotency-key")
    if idempotency_key is not None and not _KEY_HEADER.fullmatch(idempotency_key):
        return None
    try:
        # As FastAPI reads a JSON body: json.loads, then the model in Python mode.
        body = JobCreate.model_validate(json.loads(await request.body()))
        return key, body, idempotency_key
    except (ValueError, ValidationError, RecursionError):  # json's errors are ValueErrors
        return None


def _json(out: JobOut, status: int, headers: dict[str, str] | None = None) -> Response:
    # As FastAPI serializes a response_model (by alias, nothing excluded).
    return Response(out.model_dump_json(by_alias=True), status, headers, "application/json")


router.add_api_route(
    "",
    submit_job,
    methods=["POST"],
    response_model=JobOut,
    status_code=201,
    summary="Submit a job (developer)",
    responses={200: {"model": JobOut, "description": "A retry: the job the key created"}},
    route_class_override=shortcut_route(_submit_shortcut),
)


@router.get("", response_model=Page[JobOut], summary="List my jobs (admins: all)")
def list_jobs(
    session: SessionDep, account: CurrentAccount, query: Annotated[JobQuery, Query()]
) -> Page[JobOut]:
    rows, total = service.list_jobs(session, account, query)
    return Page.of(job_outs(session, rows), total, query)


@router.get("/{job_id}", response_model=JobDetail, summary="Read one of my jobs")
def get_job(session: SessionDep, account: CurrentAccount, job_id: ObjectId) -> JobDetail:
    job = service.get_job(session, account, job_id)
    allocation = latest_allocation(session, job.id)
    return JobDetail(
        **job_out(session, job).model_dump(),
        allocation=allocation_out(allocation) if allocation else None,
        unmatched=unmatched(session, job, get_settings()) if job.state == JobState.open else None,
    )


def allocation_out(a: Allocation) -> AllocationOut:
    return AllocationOut(
        id=a.id,
        status=a.status.value,
        offer_id=a.offer_id,
        round_id=a.round_id,
        accelerators=a.accelerators,
        price_per_hour=micros_to_usd(a.price_per_hour_micros),
        runtime_hours=a.runtime_hours,
        rtt_ms=a.rtt_ms,
        estimated_cost=EstimatedCost(
            compute=micros_to_usd(a.compute_micros),
            egress=micros_to_usd(a.egress_micros),
            latency=micros_to_usd(a.latency_micros),
            total=micros_to_usd(a.cost_micros),
        ),
        energy_kwh=a.energy_kwh,
        gco2=a.gco2,
        created_at=a.created_at,
        ended_at=a.ended_at,
    )


@router.get("/{job_id}/runs", response_model=list[RunOut], summary="Every run of one of my jobs")
def job_runs(session: SessionDep, account: CurrentAccount, job_id: ObjectId) -> list[RunOut]:
    """The job's runs, oldest first: node, hardware, region, times, usage, and the reason
    each ended, the agent's errors included."""
    job = service.get_job(session, account, job_id)
    return service.job_runs(session, job)


@router.post("/{job_id}/cancel", response_model=JobOut, summary="Cancel one of my jobs")
def cancel_job(session: SessionDep, account: CurrentAccount, job_id: ObjectId) -> JobOut:
    return job_out(session, service.cancel_job(session, account, job_id))
