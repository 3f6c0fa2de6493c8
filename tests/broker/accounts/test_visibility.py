"""Who reads which rows: the one rule every service starts its queries from."""

from __future__ import annotations

from sqlalchemy.orm import Session

from broker.accounts import visibility
from broker.models.account import Role
from broker.models.offer import OfferStatus
from tests.factories import make_account, make_job, make_offer


def test_accounts_read_their_own_rows_and_admins_every_row(db: Session) -> None:
    alice, _ = make_account(db, Role.developer)
    bob, _ = make_account(db, Role.developer)
    admin, _ = make_account(db, Role.admin)
    mine, theirs = make_job(db, alice), make_job(db, bob)
    assert set(db.scalars(visibility.readable_jobs(alice))) == {mine}
    assert {mine, theirs} <= set(db.scalars(visibility.readable_jobs(admin)))
    assert visibility.owns(alice, alice.id)
    assert not visibility.owns(alice, bob.id)
    assert visibility.owns(admin, bob.id)
    assert visibility.owns(None, bob.id)


def test_anyone_reads_an_active_offer_but_only_its_provider_a_withdrawn_one(db: Session) -> None:
    provider, _ = make_account(db, Role.provider)
    other, _ = make_account(db, Role.provider)
    developer, _ = make_account(db, Role.developer)
    active, withdrawn = make_offer(db, provider), make_offer(db, provider)
    withdrawn.status = OfferStatus.withdrawn
    db.flush()
    assert active in set(db.scalars(visibility.readable_offers(developer)))
    assert withdrawn not in set(db.scalars(visibility.readable_offers(other)))
    assert {active, withdrawn} <= set(db.scalars(visibility.readable_offers(provider)))
    assert set(db.scalars(visibility.changeable_offers(other))).isdisjoint({active, withdrawn})
