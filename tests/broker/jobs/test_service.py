"""Job operations called directly: as the dashboard calls them, and the submission path
below the API (what a keyed submission stores and returns)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from broker.errors import Conflict, NotFound
from broker.jobs.schemas import JobCreate
from broker.jobs.service import _new_job, _request_hash, cancel_job, change_bid, submit_job
from broker.models.account import Account, Role
from broker.models.job import Job
from tests.factories import make_account, make_job


def test_an_open_jobs_bid_changes_and_only_its_owner_may(db: Session) -> None:
    developer, _ = make_account(db, Role.developer)
    other, _ = make_account(db, Role.developer)
    admin, _ = make_account(db, Role.admin)
    job = make_job(db, developer, max_price_per_hour="3.00")
    before = job.updated_at

    changed = change_bid(db, developer, job.id, Decimal("3.25"))
    assert changed.max_price_per_hour_micros == 3_250_000
    assert changed.updated_at > before
    with pytest.raises(NotFound):
        change_bid(db, other, job.id, Decimal("9"))
    assert change_bid(db, admin, job.id, Decimal("3.5")).max_price_per_hour_micros == 3_500_000

    cancel_job(db, developer, job.id)
    with pytest.raises(Conflict, match="only an open job's bid can change"):
        change_bid(db, developer, job.id, Decimal("4"))


BODY = {
    "platforms": ["cuda", "rocm"],
    "max_price_per_hour": "3.10",
    "duration_hours": 3,
    "accelerators": 2,
    "min_memory_gib": 40,
    "allowed_countries": ["NL", "DE"],
    "accelerator_models": ["H100"],
}


def test_a_keyed_job_is_stored_whole_and_returned_loaded(db: Session) -> None:
    developer, _ = make_account(db, Role.developer)
    job, created = submit_job(db, developer, JobCreate.model_validate(BODY), "key-1")
    assert created
    state = inspect(job)
    assert state.persistent
    assert not state.expired_attributes  # nothing left to load behind the scenes
    shown = {c.key: getattr(job, c.key) for c in Job.__table__.columns}
    db.expire_all()
    stored = db.scalar(select(Job).where(Job.id == job.id))
    assert stored is not None
    assert {c.key: getattr(stored, c.key) for c in Job.__table__.columns} == shown
    assert stored.usage_ms == 0
    assert stored.created_at == stored.updated_at


def test_request_hashes_stay_as_stored() -> None:
    """Hashes of earlier submissions are in the database: a retry after an upgrade
    must still match them."""
    account = Account(id="acc_x", name="x", role=Role.developer)
    job = _new_job(account, JobCreate.model_validate(BODY), None)
    assert _request_hash(job) == "d0fc1dbca1175e9213c243e60ea2e825fce5a4bcf2ac82053956724ab536003f"
