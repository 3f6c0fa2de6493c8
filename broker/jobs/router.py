from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

from broker.allocations import logs
from broker.allocations.schemas import AllocationOut
from broker.auth import BATCHED_DEVELOPER, BatchedDeveloper, CurrentAccount, bearer_key
from broker.config import get_settings
from broker.db import SessionDep, Transactions, TransactionsDep, request_transactions
from broker.jobs import intake, service, views
from broker.jobs.schemas import JobCreate, JobDetail, JobOut, JobQuery, LogLineOut, RunOut
from broker.ledger import latest_allocation
from broker.market.explain import unmatched
from broker.models.account import Account
from broker.models.job_state import JobState
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
        return views.job_out_of(job, views.UNMATCHED)  # a new job has no match to look up
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
            return views.job_out_of(job, views.UNMATCHED)
        return views.job_out(session, job)


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
        return _json(views.job_out_of(job, views.UNMATCHED), 201)
    out = await run_in_threadpool(_replay, transactions, developer, body, idempotency_key)
    return _json(out, 200, {_REPLAYED: "true"})


# The header's rule is the route's own declaration (``IdempotencyKey``), not a copy.
_KEY_HEADER = TypeAdapter(IdempotencyKey)


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
    if idempotency_key is not None:
        try:
            _KEY_HEADER.validate_python(idempotency_key)
        except ValidationError:
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
    return Page.of(views.job_outs(session, rows), total, query)


@router.get("/{job_id}", response_model=JobDetail, summary="Read one of my jobs")
def get_job(session: SessionDep, account: CurrentAccount, job_id: ObjectId) -> JobDetail:
    job = service.get_job(session, account, job_id)
    allocation = latest_allocation(session, job.id)
    return JobDetail(
        **views.job_out(session, job).model_dump(),
        allocation=AllocationOut.of(allocation) if allocation else None,
        unmatched=unmatched(session, job, get_settings()) if job.state == JobState.open else None,
    )


@router.get("/{job_id}/runs", response_model=list[RunOut], summary="Every run of one of my jobs")
def job_runs(session: SessionDep, account: CurrentAccount, job_id: ObjectId) -> list[RunOut]:
    """The job's runs, oldest first: node, hardware, region, times, usage, and the reason
    each ended, the agent's errors included."""
    job = service.get_job(session, account, job_id)
    return service.job_runs(session, job)


@router.get(
    "/{job_id}/logs", response_model=list[LogLineOut], summary="The log of every run of my job"
)
def job_logs(session: SessionDep, account: CurrentAccount, job_id: ObjectId) -> list[LogLineOut]:
    """The lines the agents reported of the job's runs, run by run (oldest first): what
    the agent did (fetching, start-up, checkpoints, the end) and what the program wrote
    to its stderr. At most 1,000 lines a run are kept."""
    job = service.get_job(session, account, job_id)
    return [
        LogLineOut(
            allocation_id=line.allocation_id,
            seq=line.seq,
            at=line.at,
            stream=line.stream,
            text=line.text,
        )
        for line in logs.of_job(session, job.id)
    ]


@router.post("/{job_id}/cancel", response_model=JobOut, summary="Cancel one of my jobs")
def cancel_job(session: SessionDep, account: CurrentAccount, job_id: ObjectId) -> JobOut:
    return views.job_out(session, service.cancel_job(session, account, job_id))
