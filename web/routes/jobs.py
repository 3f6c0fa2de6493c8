"""A developer's jobs: the list, one job, placing a bid, changing it, cancelling."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import TypeAdapter, ValidationError

from broker.accounts.callers import check_role
from broker.accounts.service import account_names
from broker.accounts.visibility import sees_all
from broker.allocations import logs
from broker.allocations.schemas import AllocationOut
from broker.blobs.service import get_blob, get_store
from broker.config import get_settings
from broker.db import SessionDep, utcnow
from broker.errors import BrokerError, NotFound
from broker.jobs import service
from broker.jobs.schemas import JobCreate, JobOut, JobQuery, RunOut, Unmatched
from broker.jobs.views import job_out, job_outs
from broker.ledger import latest_allocations
from broker.market.explain import RULE_TEXT, unmatched, unmatched_many
from broker.models.account import Account, Role
from broker.models.blob import BlobKind
from broker.models.job_state import FINAL_STATES, JobState
from broker.models.run_log import RunLogLine
from broker.money import Usd
from broker.offers.schemas import OfferOut
from broker.types import ObjectId
from web.forms import attempt, choice, given, listed, text, values
from web.render import WebRoute, form_errors, page, redirect
from web.session import CheckedForm, WebUser, WebUserDep

router = APIRouter(route_class=WebRoute, include_in_schema=False)

PER_PAGE = 20
PLATFORMS = ("cuda", "rocm", "tpu", "cpu")
_usd = TypeAdapter(Usd)


@dataclass(frozen=True)
class JobView:
    """A job as the pages show it: the job, where it was matched, and why it waits."""

    job: JobOut
    allocation: AllocationOut | None
    offer: OfferOut | None
    waiting: Unmatched | None
    runs: list[RunOut] = field(default_factory=list)
    log: dict[str, list[RunLogLine]] = field(default_factory=dict)  # by allocation

    @property
    def final(self) -> bool:
        return self.job.state in FINAL_STATES

    def eta_seconds(self, now: datetime | None = None) -> float | None:
        """Seconds until a running job ends, at the pace it has kept: for an iterative
        job, its steps so far; for a single call, its match's estimated runtime."""
        job = self.job
        if job.state != JobState.running or job.started_at is None:
            return None
        elapsed = ((now or utcnow()) - job.started_at).total_seconds()
        if job.steps and job.steps_done:
            return max(0.0, elapsed * (job.steps - job.steps_done) / job.steps_done)
        if self.allocation is not None and not job.steps:
            return max(0.0, self.allocation.runtime_hours * 3600 - elapsed)
        return None

    @property
    def reason(self) -> str:
        """The market's explanation in one line: the rule that rules out the most."""
        w = self.waiting
        if w is None:
            return ""
        if not w.offers_considered:
            return "No offers are listed yet."
        if w.feasible:
            return f"{w.feasible} of {w.offers_considered} offers fit; waiting for the next round."
        rule, count = max(w.ruled_out.items(), key=lambda item: item[1])
        nearest = f"; {w.nearest[rule]}" if rule in w.nearest else ""
        return f"No offer fits: {RULE_TEXT[rule]} ({count} of {w.offers_considered}{nearest})."


def _developer(user: WebUser) -> Account:
    return check_role(user.account, Role.developer)


@router.get("/jobs")
def jobs(
    request: Request,
    session: SessionDep,
    user: WebUserDep,
    state: Annotated[str, Query(max_length=16)] = "",
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> Response:
    account = _developer(user)
    wanted = choice(JobState, state, "state")
    rows, total = service.list_jobs(
        session, account, JobQuery(state=wanted, limit=PER_PAGE, offset=offset)
    )
    placed = latest_allocations(session, [job.id for job in rows])
    waiting = unmatched_many(session, [j for j in rows if j.state == JobState.open], get_settings())
    views = []
    for job, shown in zip(rows, job_outs(session, rows), strict=True):
        allocation, offer = placed.get(job.id, (None, None))
        views.append(
            JobView(
                shown,
                AllocationOut.of(allocation) if allocation else None,
                OfferOut.model_validate(offer) if offer else None,
                waiting.get(job.id),
            )
        )
    names = account_names(session, [j.account_id for j in rows]) if sees_all(user.account) else {}
    return page(
        request,
        "jobs.html",
        user,
        views=views,
        names=names,
        total=total,
        limit=PER_PAGE,
        offset=offset,
        state=state,
        states=[s.value for s in JobState],
    )


@router.get("/jobs/new")
def new_job(request: Request, user: WebUserDep) -> Response:
    _developer(user)
    return _job_form(request, user, {"request_id": str(uuid.uuid4())})


def _job_form(
    request: Request,
    user: WebUser,
    form: dict[str, str],
    errors: dict[str, str] | None = None,
    platforms: list[str] | None = None,
) -> Response:
    return page(
        request,
        "job_new.html",
        user,
        status_code=422 if errors else 200,
        form=form,
        errors=errors or {},
        platforms=PLATFORMS,
        checked=platforms if platforms is not None else ["cuda"],
        capacity_bids=get_settings().allow_capacity_bids,
    )


@router.post("/jobs/new")
def submit_job(
    request: Request, session: SessionDep, user: WebUserDep, form: CheckedForm
) -> Response:
    account = _developer(user)
    fields = given(
        form,
        (
            "name",
            "accelerators",
            "min_memory_gib",
            "max_price_per_hour",
            "budget_usd",
            "duration_hours",
            "deadline_hours",
            "priority",
        ),
    )
    platforms = listed(form, "platforms")
    if platforms:  # none ticked: the service says what to give
        fields["platforms"] = platforms
    fields["accelerator_models"] = listed(form, "accelerator_models")
    fields["allowed_countries"] = [c.upper() for c in listed(form, "allowed_countries")]
    # The form's own id, made when it was shown: submitting it twice (a double
    # click, a reload) returns the first job instead of placing a second bid.
    request_id = text(form, "request_id")[:255] or None
    try:
        data = JobCreate.model_validate(fields)
        job, _ = attempt(session, lambda: service.submit_job(session, account, data, request_id))
    except (ValidationError, BrokerError) as e:
        return _job_form(request, user, values(form), form_errors(e), platforms)
    return redirect(f"/jobs/{job.id}", notice="submitted")


def _view(session: SessionDep, user: WebUser, job_id: str) -> JobView:
    job = service.get_job(session, _developer(user), job_id)
    allocation, offer = latest_allocations(session, [job.id]).get(job.id, (None, None))
    waiting = unmatched(session, job, get_settings()) if job.state == JobState.open else None
    return JobView(
        job_out(session, job),
        AllocationOut.of(allocation) if allocation else None,
        OfferOut.model_validate(offer) if offer else None,
        waiting,
        service.job_runs(session, job),
        _log_by_run(session, job.id),
    )


def _log_by_run(session: SessionDep, job_id: str) -> dict[str, list[RunLogLine]]:
    by_run: dict[str, list[RunLogLine]] = {}
    for line in logs.of_job(session, job_id):
        by_run.setdefault(line.allocation_id, []).append(line)
    return by_run


def _job_page(
    request: Request,
    session: SessionDep,
    user: WebUser,
    job_id: str,
    notice: str = "",
    errors: dict[str, str] | None = None,
    status: int = 200,
    form: dict[str, str] | None = None,
) -> Response:
    return page(
        request,
        "job.html",
        user,
        status_code=status,
        view=_view(session, user, job_id),
        rule_text=RULE_TEXT,
        notice=notice,
        errors=errors or {},
        form=form or {},
    )


@router.get("/jobs/{job_id}")
def job(
    request: Request,
    session: SessionDep,
    user: WebUserDep,
    job_id: ObjectId,
    notice: Annotated[str, Query(pattern="^(submitted|rebid|cancelled)?$")] = "",
) -> Response:
    return _job_page(request, session, user, job_id, notice)


@router.post("/jobs/{job_id}/bid")
def change_bid(
    request: Request, session: SessionDep, user: WebUserDep, job_id: ObjectId, form: CheckedForm
) -> Response:
    account = _developer(user)
    try:
        price: Decimal = _usd.validate_python(text(form, "max_price_per_hour"))
        attempt(session, lambda: service.change_bid(session, account, job_id, price))
    except ValidationError as e:
        errors = {"max_price_per_hour": str(e.errors()[0]["msg"]).removeprefix("Value error, ")}
        return _job_page(
            request, session, user, job_id, errors=errors, status=422, form=values(form)
        )
    except BrokerError as e:
        if isinstance(e, NotFound):
            raise
        return _job_page(
            request, session, user, job_id, errors=form_errors(e), status=409, form=values(form)
        )
    return redirect(f"/jobs/{job_id}", notice="rebid")


@router.post("/jobs/{job_id}/cancel")
def cancel(session: SessionDep, user: WebUserDep, job_id: ObjectId, _: CheckedForm) -> Response:
    service.cancel_job(session, _developer(user), job_id)
    return redirect(f"/jobs/{job_id}", notice="cancelled")


@router.get("/jobs/{job_id}/result")
def result(session: SessionDep, user: WebUserDep, job_id: ObjectId) -> Response:
    """The job's output arrays (an array bundle, as the SDK's ``job.result()`` reads)."""
    job = service.get_job(session, _developer(user), job_id)
    if job.result_sha256 is None:
        raise NotFound(f"job {job_id} has no result yet")
    blob = get_blob(session, user.account, job.result_sha256, BlobKind.arrays)
    return StreamingResponse(
        get_store().chunks(blob.sha256),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(blob.size),
            "Content-Disposition": f'attachment; filename="{job.id}-result.arrays"',
        },
    )
