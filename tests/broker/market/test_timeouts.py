"""Runs always end: matches never started go back to the book, offers that keep leaving
them unstarted are suspended, and runs past their deadline or their offer's hours end."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from broker.accounts.callers import Caller
from broker.allocations import service as runs
from broker.db import new_id, utcnow
from broker.market.timeouts import sweep_runs
from broker.models.account import Account, Role
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.market import Allocation
from broker.models.offer import Offer, OfferStatus
from tests.conftest import ClientFactory
from tests.factories import make_account, make_job, make_offer

SWEEP: dict[str, Any] = {
    "start_timeout_s": 300.0,
    "max_unstarted": 3,
    "margin_s": 120.0,
    "max_attempts": 3,
}


def _match(db: Session, job: Job, offer: Offer, at: datetime) -> Allocation:
    """What a clearing round leaves: the job matched, the accelerators held."""
    allocation = Allocation(
        id=new_id("alc"),
        job_id=job.id,
        offer_id=offer.id,
        accelerators=job.accelerators,
        price_per_hour_micros=offer.price_per_hour_micros,
        runtime_hours=1.0,
        rtt_ms=0.0,
        compute_micros=0,
        egress_micros=0,
        latency_micros=0,
        cost_micros=0,
        created_at=at,
    )
    job.move_to(JobState.matched)
    offer.count -= job.accelerators
    db.add(allocation)
    db.flush()
    return allocation


def _market(db: Session) -> tuple[Account, Account, Offer]:
    provider, _ = make_account(db, Role.provider)
    developer, _ = make_account(db, Role.developer)
    return provider, developer, make_offer(db, provider, count=4, price_per_hour="0")


def test_a_match_never_started_goes_back_to_the_market(db: Session) -> None:
    _, developer, offer = _market(db)
    now = utcnow()
    stale = make_job(db, developer)
    fresh = make_job(db, developer)
    _match(db, stale, offer, now - timedelta(seconds=301))
    _match(db, fresh, offer, now - timedelta(seconds=10))
    assert offer.count == 2

    report = sweep_runs(db, **SWEEP, now=now)

    assert report.unstarted == 1
    assert stale.state == JobState.open
    assert stale.attempts == 0  # it never ran: no attempt spent
    assert stale.error is not None
    assert "did not start it within 300 s" in stale.error
    assert fresh.state == JobState.matched
    assert offer.count == 3
    assert offer.unstarted_strikes == 1
    assert offer.status == OfferStatus.active


def test_an_offer_that_leaves_matches_unstarted_is_suspended(
    db: Session, client_for: ClientFactory
) -> None:
    """The review's case: an offer listed by hand for 100,000 accelerators at price 0
    captures every job and starts none."""
    provider, key = make_account(db, Role.provider)
    developer, _ = make_account(db, Role.developer)
    offer = make_offer(db, provider, count=100_000, price_per_hour="0")
    now = utcnow()
    jobs = [make_job(db, developer) for _ in range(4)]
    for job in jobs[:3]:
        _match(db, job, offer, now - timedelta(seconds=400))
    _match(db, jobs[3], offer, now - timedelta(seconds=5))  # not yet due

    report = sweep_runs(db, **SWEEP, now=now)

    assert report.unstarted == 3
    assert report.suspended == 1
    assert offer.status == OfferStatus.suspended
    assert offer.suspended_reason is not None
    assert "3 matches in a row were not started within 300 s" in offer.suspended_reason
    # Its other unstarted matches go back too, and it holds nothing any more.
    assert all(job.state == JobState.open for job in jobs)
    assert offer.count == offer.capacity
    # The provider sees why; the market no longer lists it.
    provider_client = client_for(key)
    seen = provider_client.get(f"/v1/offers/{offer.id}").json()
    assert seen["status"] == "suspended"
    assert "withdraw this offer" in seen["suspended_reason"]
    book = provider_client.get("/v1/offers", params={"status": "active"}).json()
    assert offer.id not in [o["id"] for o in book["items"]]
    # Withdrawing it lifts the suspension: the provider may list again.
    assert provider_client.delete(f"/v1/offers/{offer.id}").json()["status"] == "withdrawn"


def test_a_started_match_clears_the_offers_strikes(db: Session) -> None:
    provider, developer, offer = _market(db)
    now = utcnow()
    for _ in range(2):
        _match(db, make_job(db, developer), offer, now - timedelta(seconds=400))
    sweep_runs(db, **SWEEP, now=now)
    assert offer.unstarted_strikes == 2
    started = make_job(db, developer)
    allocation = _match(db, started, offer, now)
    runs.start(db, Caller(provider, None), allocation.id)
    assert offer.unstarted_strikes == 0
    _match(db, make_job(db, developer), offer, now - timedelta(seconds=400))
    sweep_runs(db, **SWEEP, now=now)
    assert offer.status == OfferStatus.active  # one strike, not three


def test_runs_past_their_deadline_fail_and_past_the_offers_hours_go_back(db: Session) -> None:
    provider, developer, offer = _market(db)
    hours_offer = make_offer(db, provider, count=4, price_per_hour="0", available_hours=1)
    now = utcnow()
    late = make_job(db, developer, deadline_hours=1, duration_hours=0.5)
    on_time = make_job(db, developer, deadline_hours=3)
    out_of_hours = make_job(db, developer)
    for job, where in ((late, offer), (on_time, offer), (out_of_hours, hours_offer)):
        allocation = _match(db, job, where, now - timedelta(hours=2))
        runs.start(db, Caller(provider, None), allocation.id)
        allocation.started_at = now - timedelta(hours=2)
    db.flush()

    report = sweep_runs(db, **SWEEP, now=now)

    assert (report.past_deadline, report.past_available) == (1, 1)
    assert late.state == JobState.failed
    assert late.error is not None
    assert "passed the job's deadline (1 h" in late.error
    assert on_time.state == JobState.running
    assert out_of_hours.state == JobState.open  # resumes elsewhere
    assert out_of_hours.error is not None
    assert "available hours" in out_of_hours.error
    # Within the margin nothing happens yet.
    edge = make_job(db, developer, deadline_hours=1, duration_hours=0.5)
    allocation = _match(db, edge, offer, now)
    runs.start(db, Caller(provider, None), allocation.id)
    allocation.started_at = now - timedelta(hours=1, seconds=60)
    db.flush()
    assert not sweep_runs(db, **SWEEP, now=now)
    assert edge.state == JobState.running
