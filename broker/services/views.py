"""Services as the API and the dashboard show them: replicas, last minute's figures,
scale events."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.config import get_settings
from broker.db import utcnow
from broker.ledger import latest_allocations
from broker.models.job import Job
from broker.models.offer import Offer
from broker.models.service import Service, ServiceEvent, ServiceWindow
from broker.money import micros_to_usd
from broker.services import placement
from broker.services.relay import http_form
from broker.services.schemas import (
    RegionStats,
    ReplicaOut,
    ServiceDetail,
    ServiceEventOut,
    ServiceOut,
    UserRegion,
)
from broker.services.service import LIVE_REPLICA, replicas

MINUTE = timedelta(minutes=1)


def _windows(session: Session, service_id: str, now: datetime) -> list[ServiceWindow]:
    return list(
        session.scalars(
            select(ServiceWindow)
            .where(ServiceWindow.service_id == service_id, ServiceWindow.ended_at > now - MINUTE)
            .order_by(ServiceWindow.ended_at)
        )
    )


def service_out(session: Session, service: Service, now: datetime | None = None) -> ServiceOut:
    now = now or utcnow()
    return ServiceOut(**_fields(session, service, _windows(session, service.id, now), now))


def _fields(
    session: Session, service: Service, windows: list[ServiceWindow], now: datetime
) -> dict[str, object]:
    live = replicas(session, service.id, LIVE_REPLICA)
    runs = latest_allocations(session, [j.id for j in live])
    by_scope: dict[str, list[ServiceWindow]] = defaultdict(list)
    for w in windows:
        by_scope[w.scope].append(w)
    fresh = now - timedelta(seconds=3 * get_settings().service_window_s)
    out: list[ReplicaOut] = []
    for job in live:
        allocation, offer = runs.get(job.id, (None, None))
        if allocation is not None and allocation.status != "active":
            allocation, offer = None, None
        mine = by_scope.get(f"replica:{allocation.id}", []) if allocation else []
        out.append(
            ReplicaOut(
                job_id=job.id,
                state=job.state,
                allocation_id=allocation.id if allocation else None,
                offer_id=offer.id if offer else None,
                accelerator=offer.accelerator if offer else None,
                region=offer.region if offer else None,
                country=offer.country if offer else None,
                lat=offer.lat if offer else None,
                lon=offer.lon if offer else None,
                since=job.started_at if allocation else None,
                healthy=bool(mine) and mine[-1].ended_at > fresh,
                queued=mine[-1].queue_mean if mine else None,
                requests=sum(w.requests for w in mine),
                waiting_for=_waiting_for(session, job),
            )
        )
    return dict(
        id=service.id,
        name=service.name,
        state=service.state,
        endpoint=f"/v1/services/{service.id}/infer",
        artifact=service.artifact_sha256,
        relay=http_form(get_settings().relay_public_url),
        users=[UserRegion(**u) for u in service.users],
        latency_slo_ms=service.latency_slo_ms,
        min_replicas=service.min_replicas,
        max_replicas=service.max_replicas,
        desired_replicas=service.desired_replicas,
        max_price_per_hour=micros_to_usd(service.max_price_per_hour_micros),
        platforms=service.platforms,
        allowed_countries=service.allowed_countries,
        target_queue=service.target_queue,
        target_p95_ms=service.target_p95_ms,
        unmatched=service.placement_note,
        error=service.error,
        replicas=out,
        created_at=service.created_at,
        undeployed_at=service.undeployed_at,
    )


def _waiting_for(session: Session, job: Job) -> str | None:
    if job.state != "open" or job.pinned_offer_id is None:
        return None
    offer = session.get(Offer, job.pinned_offer_id)
    return None if offer is None else f"{offer.accelerator} in {offer.region} ({offer.id})"


def detail(session: Session, service: Service, now: datetime | None = None) -> ServiceDetail:
    now = now or utcnow()
    windows = _windows(session, service.id, now)
    whole = [w for w in windows if w.scope == "service"]
    seconds = sum(w.seconds for w in whole)
    regions = []
    for index in range(len(service.users)):
        mine = [w for w in windows if w.scope == f"region:{index}"]
        regions.append(
            RegionStats(
                region=placement.region_name(service, index),
                requests=sum(w.requests for w in mine),
                errors=sum(w.errors for w in mine),
                within_slo=sum(w.within_slo for w in mine),
                **_percentiles(mine),
            )
        )
    events = session.scalars(
        select(ServiceEvent)
        .where(ServiceEvent.service_id == service.id)
        .order_by(ServiceEvent.at.desc(), ServiceEvent.id.desc())
        .limit(50)
    ).all()
    return ServiceDetail(
        **_fields(session, service, windows, now),
        requests_per_second=sum(w.requests for w in whole) / seconds if seconds else 0.0,
        errors=sum(w.errors for w in whole),
        **_percentiles(whole),
        regions=regions,
        events=[
            ServiceEventOut(
                at=e.at,
                kind=e.kind,
                replicas_from=e.replicas_from,
                replicas_to=e.replicas_to,
                reason=e.reason,
            )
            for e in events
        ],
    )


def _percentiles(windows: list[ServiceWindow]) -> dict[str, float | None]:
    """Over several windows: the request-weighted mean of each window's percentile
    (exact within a window, an approximation across them)."""
    weighted = [w for w in windows if w.p50_ms is not None and w.requests]
    total = sum(w.requests for w in weighted)
    if not total:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    return {
        name: sum((getattr(w, name) or 0.0) * w.requests for w in weighted) / total
        for name in ("p50_ms", "p95_ms", "p99_ms")
    }
