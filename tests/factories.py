"""Small factories: rows made through the real services, with sensible defaults."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from broker.accounts.service import create_account
from broker.db import new_id, utcnow
from broker.jobs.schemas import JobCreate
from broker.jobs.service import submit_job
from broker.models.account import Account, Role
from broker.models.job import Job
from broker.models.market import Allocation, AllocationStatus
from broker.models.offer import Offer
from broker.offers.schemas import OfferCreate
from broker.offers.service import create_offer

_counter = itertools.count(1)


def make_account(
    db: Session, role: Role = Role.developer, name: str | None = None
) -> tuple[Account, str]:
    return create_account(db, name or f"{role.value}-{next(_counter)}", role)


def offer_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "accelerator": "h100-sxm",
        "count": 8,
        "price_per_hour": "2.50",
        "region": "europe-west4",
        "country": "NL",
        "lat": 53.44,
        "lon": 6.84,
    }
    body.update(overrides)
    return body


def job_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "platforms": ["cuda", "cpu"],
        "accelerators": 1,
        "max_price_per_hour": "3.00",
        "duration_hours": 2,
    }
    body.update(overrides)
    return body


def make_offer(db: Session, provider: Account, **overrides: Any) -> Offer:
    return create_offer(db, provider, OfferCreate.model_validate(offer_body(**overrides)))


def make_job(db: Session, developer: Account, **overrides: Any) -> Job:
    job, _ = submit_job(db, developer, JobCreate.model_validate(job_body(**overrides)))
    return job


def make_run(
    db: Session,
    job: Job,
    offer: Offer,
    usage_ms: int,
    *,
    price_per_hour_micros: int | None = None,
    fee_ppm: int = 0,
    ended_at: datetime | None = None,
    status: AllocationStatus = AllocationStatus.finished,
) -> Allocation:
    """A run of ``job`` on ``offer`` that metered ``usage_ms`` accelerator-milliseconds
    and ended at ``ended_at`` (None: still running), as a clearing round and an agent
    would have left it."""
    now = utcnow()
    price = offer.price_per_hour_micros if price_per_hour_micros is None else price_per_hour_micros
    allocation = Allocation(
        id=new_id("alc"),
        job_id=job.id,
        offer_id=offer.id,
        status=status if ended_at is not None else AllocationStatus.active,
        accelerators=job.accelerators,
        price_per_hour_micros=price,
        runtime_hours=1.0,
        rtt_ms=0.0,
        compute_micros=price * job.accelerators,
        egress_micros=0,
        latency_micros=0,
        cost_micros=price * job.accelerators,
        fee_ppm=fee_ppm,
        started_at=(ended_at or now) - timedelta(milliseconds=usage_ms),
        usage_ms=usage_ms,
        ended_at=ended_at,
    )
    job.usage_ms += usage_ms
    db.add(allocation)
    db.flush()
    return allocation
