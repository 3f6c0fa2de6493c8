"""The allocation ledger: the one place matched work is created, moved and handed back."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from broker import ledger
from broker.errors import Conflict
from broker.models.account import Role
from broker.models.job import Job
from broker.models.job_state import InvalidTransition, JobState
from broker.models.market import Allocation, AllocationStatus
from broker.models.offer import Offer, OfferStatus
from tests.factories import make_account, make_job, make_offer


def _match(job: Job, offer: Offer, state: JobState | None = None) -> ledger.NewAllocation:
    return ledger.NewAllocation(
        job_id=job.id,
        job_state=state or JobState(job.state),
        offer_id=offer.id,
        accelerators=job.accelerators,
        price_per_hour_micros=offer.price_per_hour_micros,
        runtime_hours=1.0,
        startup_seconds=0.0,
        energy_kwh=0.0,
        gco2=0.0,
        rtt_ms=0.0,
        compute_micros=offer.price_per_hour_micros * job.accelerators,
        egress_micros=0,
        latency_micros=0,
        fee_ppm=0,
    )


@pytest.fixture
def pair(db: Session) -> tuple[Job, Offer]:
    developer, _ = make_account(db, Role.developer)
    provider, _ = make_account(db, Role.provider)
    return make_job(db, developer, accelerators=2), make_offer(db, provider, count=8)


def test_a_round_s_matches_hold_capacity_and_move_jobs_through_the_state_machine(
    db: Session, pair: tuple[Job, Offer]
) -> None:
    job, offer = pair
    ledger.allocate(db, None, [_match(job, offer)])
    db.expire_all()
    assert job.state == JobState.matched
    assert offer.count == 6
    allocation = db.scalars(select(Allocation).where(Allocation.job_id == job.id)).one()
    assert allocation.cost_micros == allocation.compute_micros
    # Clearing's bulk write takes the same transitions as Job.move_to: a running
    # job cannot be matched again.
    with pytest.raises(InvalidTransition):
        ledger.allocate(db, None, [_match(job, offer, JobState.running)])


def test_withdrawing_an_offer_hands_its_unstarted_jobs_back(
    db: Session, pair: tuple[Job, Offer]
) -> None:
    job, offer = pair
    ledger.allocate(db, None, [_match(job, offer)])
    db.expire_all()
    with pytest.raises(Conflict):
        ledger.resize_offer(offer, 1)  # 2 are held
    ledger.withdraw_offer(db, offer)
    db.expire_all()
    assert offer.status == OfferStatus.withdrawn
    assert offer.count == 8
    assert job.state == JobState.open
    assert ledger.latest_allocation(db, job.id).status == AllocationStatus.released  # type: ignore[union-attr]
