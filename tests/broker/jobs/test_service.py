"""Job operations called directly, as the dashboard calls them."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy.orm import Session

from broker.accounts.models import Role
from broker.errors import Conflict, NotFound
from broker.jobs.service import cancel_job, change_bid
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
