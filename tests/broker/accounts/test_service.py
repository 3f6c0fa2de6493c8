from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.accounts.models import ApiKey, Role
from broker.accounts.service import authenticate, create_account, hash_key
from broker.errors import Conflict, InvalidInput


def test_key_is_returned_once_and_stored_hashed(db: Session) -> None:
    account, key = create_account(db, "alice", Role.developer)
    stored = db.scalars(select(ApiKey).where(ApiKey.account_id == account.id)).one()
    assert key.startswith("bk_")
    assert len(key) > 40
    assert stored.key_hash == hash_key(key) != key
    assert key not in (stored.key_hash, stored.prefix)
    assert authenticate(db, key) == account


def test_wrong_or_malformed_keys_do_not_authenticate(db: Session) -> None:
    _, key = create_account(db, "bob", Role.provider)
    assert authenticate(db, key + "x") is None
    assert authenticate(db, "not-a-key") is None
    assert authenticate(db, "bk_" + "a" * 5000) is None


def test_names_are_unique_and_checked(db: Session) -> None:
    create_account(db, "carol", Role.admin)
    with pytest.raises(Conflict):
        create_account(db, "carol", Role.developer)
    with pytest.raises(InvalidInput):
        create_account(db, "  ", Role.developer)
    with pytest.raises(InvalidInput):
        create_account(db, "x" * 101, Role.developer)
