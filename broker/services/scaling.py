"""Autoscaling: how many replicas a service wants, from what the relay measured.

A service adds a replica when, over the last ``service_scale_up_s``, every window
says it is busy: requests in each replica (on average over the window) above
``target_queue``, or the 95th percentile of time in a replica above
``target_p95_ms``. It drops one after ``service_scale_down_s`` (longer) in which
every window was calm: under a quarter of the queue target and half the time
target. Each change waits as long again before the next, so a change has time
to show. Windows must cover most of the period: a relay that says nothing (no
replica connected) changes nothing. Every change is an event with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from broker.config import Settings
from broker.db import utcnow
from broker.models.service import LIVE_STATES, Service, ServiceEvent, ServiceWindow
from broker.services.service import record

COVERED = 0.8  # of a period, the windows must span this much


@dataclass(frozen=True)
class Change:
    desired: int
    kind: str
    reason: str


def _busy(service: Service, w: ServiceWindow) -> bool:
    slow = service.target_p95_ms is not None and (w.replica_p95_ms or 0.0) > service.target_p95_ms
    return w.queue_mean > service.target_queue or slow


def _calm(service: Service, w: ServiceWindow) -> bool:
    fast = service.target_p95_ms is None or (w.replica_p95_ms or 0.0) < service.target_p95_ms / 2
    return w.queue_mean < service.target_queue / 4 and fast


def decide(
    service: Service,
    windows: list[ServiceWindow],
    last_change: datetime | None,
    settings: Settings,
    now: datetime,
) -> Change | None:
    """The change the windows (the service's own, newest last) call for, if any."""

    def period(seconds: float) -> list[ServiceWindow] | None:
        if last_change is not None and now - last_change < timedelta(seconds=seconds):
            return None  # the last change has not had time to show
        since = now - timedelta(seconds=seconds)
        inside = [w for w in windows if w.ended_at > since]
        return inside if sum(w.seconds for w in inside) >= COVERED * seconds else None

    up = period(settings.service_scale_up_s)
    if (
        up
        and service.desired_replicas < service.max_replicas
        and all(_busy(service, w) for w in up)
    ):
        queue = sum(w.queue_mean for w in up) / len(up)
        why = f"{queue:.1f} requests waiting per replica (target {service.target_queue:g})"
        p95 = max((w.replica_p95_ms or 0.0) for w in up)
        if service.target_p95_ms is not None and p95 > service.target_p95_ms:
            why = f"p95 time in a replica {p95:.0f} ms (target {service.target_p95_ms:g} ms)"
        return Change(
            service.desired_replicas + 1,
            "scale_up",
            f"{why} for {settings.service_scale_up_s:g} s",
        )
    down = period(settings.service_scale_down_s)
    if (
        down
        and service.desired_replicas > service.min_replicas
        and all(_calm(service, w) for w in down)
    ):
        queue = max(w.queue_mean for w in down)
        return Change(
            service.desired_replicas - 1,
            "scale_down",
            f"at most {queue:.2f} requests waiting per replica for "
            f"{settings.service_scale_down_s:g} s (target {service.target_queue:g})",
        )
    return None


def autoscale(session: Session, settings: Settings, now: datetime | None = None) -> int:
    """Apply ``decide`` to every serving service; returns how many changed."""
    now = now or utcnow()
    longest = max(settings.service_scale_up_s, settings.service_scale_down_s)
    changed = 0
    for service in session.scalars(select(Service).where(Service.state.in_(LIVE_STATES))):
        windows = list(
            session.scalars(
                select(ServiceWindow)
                .where(
                    ServiceWindow.service_id == service.id,
                    ServiceWindow.scope == "service",
                    ServiceWindow.ended_at > now - timedelta(seconds=longest),
                )
                .order_by(ServiceWindow.ended_at)
            )
        )
        last = session.scalar(
            select(func.max(ServiceEvent.at)).where(
                ServiceEvent.service_id == service.id,
                ServiceEvent.kind.in_(("scale_up", "scale_down", "deployed")),
            )
        )
        change = decide(service, windows, last, settings, now)
        if change is None:
            continue
        record(
            session, service, change.kind, service.desired_replicas, change.desired, change.reason
        )
        service.desired_replicas = change.desired
        service.updated_at = now
        changed += 1
    return changed


def prune(session: Session, keep: timedelta = timedelta(days=7)) -> None:
    """Windows older than ``keep`` go (events stay)."""
    session.execute(
        ServiceWindow.__table__.delete().where(ServiceWindow.ended_at < utcnow() - keep)  # type: ignore[attr-defined]
    )
