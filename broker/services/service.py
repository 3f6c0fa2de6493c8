"""Services: deploy, read, undeploy; and keeping each one's replicas as it wants them.

A replica is a job of the service's (``Job.service_id``) for one accelerator,
with the service's program, price and countries. The market matches, runs,
meters and bills it as any job; it differs in two things: the agent runs it as
a long-lived process that answers requests (``broker.agent.serving``) instead of
once, and where it may go is the service's placement, pinned on the job before
each round (``Job.pinned_offer_id``, broker.services.placement).

``reconcile`` runs before each clearing round. For each live service it lets go
of replicas the autoscaler no longer wants, opens the ones it does, pins each
open one to the offer the placement chose, and fails a service whose replicas
keep failing before any has served.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker.accounts import visibility
from broker.config import Settings
from broker.db import new_id, utcnow
from broker.errors import Conflict, InvalidInput, NotFound
from broker.jobs import service as jobs
from broker.jobs.schemas import JobCreate
from broker.ledger import active_allocation, end_job
from broker.models.account import Account
from broker.models.blob import Blob, BlobGrant
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.market import Allocation
from broker.models.offer import Offer
from broker.models.service import (
    LIVE_STATES,
    Service,
    ServiceEvent,
    ServiceState,
    ServiceWindow,
)
from broker.money import usd_to_micros
from broker.services import placement
from broker.services.schemas import ServiceCreate

log = logging.getLogger(__name__)

# Replicas that fail in a row before any serves: the program cannot serve; stop trying.
MAX_FAILURES = 3
# A replica job's runtime, for the estimate a round makes: an hour of serving.
REPLICA_HOURS = 1.0
PLACED = (JobState.matched, JobState.running)
LIVE_REPLICA = (JobState.open, *PLACED)


def deploy(
    session: Session, account: Account, data: ServiceCreate, idempotency_key: str | None = None
) -> tuple[Service, bool]:
    """Check the program as a replica's job would be checked, and create the service;
    returns it and whether it is new. The same ``idempotency_key`` again returns the
    service it made (a retry whose answer was lost); with another body, Conflict."""
    request_hash = hashlib.sha256(data.model_dump_json().encode()).hexdigest()
    if idempotency_key is not None:
        existing = _by_key(session, account, idempotency_key, request_hash)
        if existing is not None:
            return existing, False
    own = session.scalar(
        select(Blob.meta)
        .join(BlobGrant, BlobGrant.sha256 == Blob.sha256)
        .where(Blob.sha256 == data.artifact, BlobGrant.account_id == account.id)
    )
    if own is not None and own.get("kind") == "iterative":
        raise InvalidInput(
            "a service serves a plain function (package(fn, *example_args)); this artifact "
            "is an iterative step",
            field="body.artifact",
        )
    replica = _replica_request(data, data.platforms)
    checked = jobs.prepare_job(session, account, replica, None)  # raises what a job would
    now = utcnow()
    service = Service(
        id=new_id("svc"),
        account_id=account.id,
        name=data.name,
        state=ServiceState.deploying,
        artifact_sha256=data.artifact,
        inputs_sha256=data.inputs,
        platforms=checked.platforms,
        users=[u.model_dump() for u in data.users],
        latency_slo_ms=data.latency_slo_ms,
        min_replicas=data.min_replicas,
        max_replicas=data.max_replicas,
        desired_replicas=data.min_replicas,
        max_price_per_hour_micros=usd_to_micros(data.max_price_per_hour),
        allowed_countries=sorted(set(data.allowed_countries)),
        target_queue=data.target_queue,
        target_p95_ms=data.target_p95_ms,
        idempotency_key=idempotency_key,
        request_hash=request_hash if idempotency_key else None,
        created_at=now,
        updated_at=now,
    )
    try:
        with session.begin_nested():  # a concurrent retry with the key: the index decides
            session.add(service)
            session.flush()
    except IntegrityError:
        assert idempotency_key is not None
        existing = _by_key(session, account, idempotency_key, request_hash)
        if existing is None:
            raise
        return existing, False
    record(session, service, "deployed", 0, data.min_replicas, "deployed by its owner")
    return service, True


def _by_key(session: Session, account: Account, key: str, request_hash: str) -> Service | None:
    existing = session.scalar(
        select(Service).where(Service.account_id == account.id, Service.idempotency_key == key)
    )
    if existing is not None and existing.request_hash != request_hash:
        raise Conflict(
            "this Idempotency-Key was used for another service; use a new key for a new one",
            field="header.Idempotency-Key",
        )
    return existing


def _replica_request(
    data: ServiceCreate | Service, platforms: Sequence[str] | None, number: int = 1
) -> JobCreate:
    from broker.money import micros_to_usd

    if isinstance(data, Service):
        price = micros_to_usd(data.max_price_per_hour_micros)
        artifact, inputs, name = data.artifact_sha256, data.inputs_sha256, data.name
    else:
        price, artifact, inputs, name = (
            data.max_price_per_hour,
            data.artifact,
            data.inputs,
            data.name,
        )
    return JobCreate(
        # Invoices name each run by its job: a service's lines read by replica.
        name=f"{name or (data.id if isinstance(data, Service) else 'service')} replica {number}"[
            :200
        ],
        artifact=artifact,
        inputs=inputs,
        platforms=list(platforms) if platforms else None,
        max_price_per_hour=price,
        duration_hours=REPLICA_HOURS,
        allowed_countries=list(data.allowed_countries),
    )


def get_service(
    session: Session, viewer: Account, service_id: str, *, lock: bool = False
) -> Service:
    stmt = select(Service).where(
        Service.id == service_id, *visibility.own_rows(viewer, Service.account_id)
    )
    if lock:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    service = session.scalar(stmt)
    if service is None:
        raise NotFound(f"no service {service_id!r} of yours")
    return service


def list_services(
    session: Session, viewer: Account, *, limit: int, offset: int
) -> tuple[list[Service], int]:
    own = visibility.own_rows(viewer, Service.account_id)
    total = session.scalar(select(func.count()).select_from(Service).where(*own)) or 0
    rows = session.scalars(
        select(Service)
        .where(*own)
        .order_by(Service.created_at.desc(), Service.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return list(rows), total


def undeploy(session: Session, viewer: Account, service_id: str) -> Service:
    """Take the service down: every replica is let go (and billed for what it ran).
    Undeploying twice is harmless."""
    service = get_service(session, viewer, service_id, lock=True)
    if service.state == ServiceState.undeployed:
        return service
    live = replicas(session, service.id)
    for job in live:
        _let_go(session, job, "the service was undeployed")
    before = sum(1 for j in live if j.state in PLACED)
    service.state = ServiceState.undeployed
    service.undeployed_at = service.updated_at = utcnow()
    record(session, service, "undeployed", before, 0, "undeployed by its owner")
    return service


def replicas(
    session: Session, service_id: str, states: Sequence[JobState] = LIVE_REPLICA
) -> list[Job]:
    return list(
        session.scalars(
            select(Job)
            .where(Job.service_id == service_id, Job.state.in_(states))
            .order_by(Job.created_at, Job.id)
        )
    )


def _let_go(session: Session, job: Job, reason: str) -> None:
    """Cancel a replica: offer row locked first, then the job's, as everywhere."""
    allocation = active_allocation(session, job.id)
    if allocation is not None:
        session.scalar(select(Offer).where(Offer.id == allocation.offer_id).with_for_update())
    session.refresh(job, with_for_update=True)
    if job.state in LIVE_REPLICA:
        end_job(session, job, JobState.cancelled, reason)


def record(
    session: Session, service: Service, kind: str, before: int, after: int, reason: str
) -> None:
    session.add(
        ServiceEvent(
            service_id=service.id,
            kind=kind,
            replicas_from=before,
            replicas_to=after,
            reason=reason[:2000],
        )
    )
    log.info("service %s: %s (%d -> %d): %s", service.id, kind, before, after, reason)


# -- keeping replicas as wanted ------------------------------------------------


@dataclass
class _Placed:
    job: Job
    offer: Offer
    allocation: Allocation


def reconcile(session: Session, settings: Settings, now: datetime | None = None) -> int:
    """Bring every live service's replicas to what it wants (see the module);
    returns how many replica jobs it opened or let go."""
    changed = 0
    live = session.scalars(
        select(Service).where(Service.state.in_(LIVE_STATES)).order_by(Service.created_at)
    ).all()
    if not live:
        return 0
    market = placement.free_offers(session)
    for service in live:
        done, pins = _reconcile_one(session, service, market, settings)
        changed += done
        market = placement.take(market, Counter(pins))  # the next service plans without them
    return changed


def _reconcile_one(
    session: Session, service: Service, market: placement.FreeOffers, settings: Settings
) -> tuple[int, list[str]]:
    """Bring one service's replicas to what it wants; returns how many replica jobs it
    opened or let go, and the offers it pinned waiting ones to."""
    if _failing(session, service):
        return 0, []
    live = replicas(session, service.id)
    placed = [p for j in live if j.state in PLACED and (p := _where(session, j)) is not None]
    waiting = [j for j in live if j.state == JobState.open]
    changed = 0
    # A replica the relay has not heard from is let go at once, not a node timeout
    # later: its users get a replacement while the node sweep is still waiting.
    for p in list(placed):
        if (why := _silent(session, p, settings)) is not None:
            _let_go(session, p.job, why)
            record(session, service, "replica_lost", len(placed), len(placed) - 1, why)
            placed.remove(p)
            changed += 1
    # Fewer wanted: let the newest placed replicas go whose users another replica
    # keeps within the SLO.
    surplus = len(placed) - service.desired_replicas
    for p in sorted(placed, key=lambda p: p.allocation.created_at, reverse=True):
        if surplus <= 0:
            break
        if placement.redundant(service, p.offer, [q.offer for q in placed if q is not p]):
            _let_go(session, p.job, "the service needs fewer replicas")
            placed.remove(p)
            surplus, changed = surplus - 1, changed + 1
    plan = placement.plan(service, [p.offer for p in placed], market)
    if plan.note != service.placement_note:
        service.placement_note = plan.note
        service.updated_at = utcnow()
    # One open replica per offer the plan chose; surplus open ones go.
    while len(waiting) < len(plan.pins):
        waiting.append(_open_replica(session, service))
        changed += 1
    while len(waiting) > len(plan.pins):
        _let_go(session, waiting.pop(), "the service needs fewer replicas")
        changed += 1
    for job, pin in zip(waiting, plan.pins, strict=True):
        if job.pinned_offer_id != pin:
            job.pinned_offer_id = pin
            job.updated_at = utcnow()
    if placed and service.state == ServiceState.deploying and _serving(session, placed):
        service.state = ServiceState.serving
        service.updated_at = utcnow()
    return changed, plan.pins


def _silent(session: Session, p: _Placed, settings: Settings) -> str | None:
    """Why a running replica counts as lost: started past ``service_start_grace_s`` ago
    (its compile included), and the relay writing windows of the service but none of
    it for three windows; None: it is not."""
    if p.job.state != JobState.running or p.allocation.started_at is None:
        return None
    now = utcnow()
    quiet = timedelta(seconds=3 * settings.service_window_s)
    if now - p.allocation.started_at < timedelta(seconds=settings.service_start_grace_s) + quiet:
        return None

    def newest(scope: str) -> datetime | None:
        return session.scalar(
            select(func.max(ServiceWindow.ended_at)).where(
                ServiceWindow.service_id == p.job.service_id, ServiceWindow.scope == scope
            )
        )

    # Against the relay's own newest window, not the clock: a relay that writes late
    # (busy, or its database slow) makes no replica look lost.
    relay = newest("service")
    if relay is None or now - relay > quiet:
        return None
    last = newest(f"replica:{p.allocation.id}")
    if last is not None and relay - last < quiet:
        return None
    return (
        f"replica {p.job.id} ({p.offer.region}) has not been connected to the relay for "
        f"{quiet.total_seconds():g} s"
    )


def _where(session: Session, job: Job) -> _Placed | None:
    allocation = active_allocation(session, job.id)
    if allocation is None:
        return None
    offer = session.get(Offer, allocation.offer_id)
    return None if offer is None else _Placed(job, offer, allocation)


def _serving(session: Session, placed: list[_Placed]) -> bool:
    """Whether a replica has come up: the relay heard from it (it compiled, warmed up
    and connected), not only that its agent started it."""
    scopes = [f"replica:{p.allocation.id}" for p in placed if p.job.state == JobState.running]
    if not scopes:
        return False
    heard = session.scalar(
        select(ServiceWindow.id)
        .where(
            ServiceWindow.service_id == placed[0].job.service_id, ServiceWindow.scope.in_(scopes)
        )
        .limit(1)
    )
    return heard is not None


def _failing(session: Session, service: Service) -> bool:
    """Fail a deploying service whose replicas failed ``MAX_FAILURES`` times in a row
    (the program cannot serve: the developer's to fix). Returns whether it failed."""
    if service.state != ServiceState.deploying:
        return False
    failed = session.scalars(
        select(Job)
        .where(Job.service_id == service.id, Job.state == JobState.failed)
        .order_by(Job.finished_at.desc())
    ).all()
    if len(failed) < MAX_FAILURES:
        return False
    live = replicas(session, service.id)
    for job in live:
        _let_go(session, job, "the service failed")
    service.state = ServiceState.failed
    service.error = f"{len(failed)} replicas failed before any served; the last: {failed[0].error}"
    service.updated_at = utcnow()
    record(session, service, "failed", len(live), 0, service.error)
    return True


def _open_replica(session: Session, service: Service) -> Job:
    account = session.get_one(Account, service.account_id)
    number = 1 + (
        session.scalar(select(func.count()).select_from(Job).where(Job.service_id == service.id))
        or 0
    )
    request = _replica_request(service, service.platforms, number)
    job = jobs.prepare_job(session, account, request, None)
    job.__dict__["service_id"] = service.id
    jobs.insert_jobs(session, [job])
    stored = session.get_one(Job, job.id)
    return stored


def check_live(service: Service) -> None:
    if service.state not in LIVE_STATES:
        raise Conflict(
            f"service {service.id} is {service.state.value}"
            + (f": {service.error}" if service.error else ""),
            field="service",
        )
