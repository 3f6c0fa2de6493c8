from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.accounts.service import (
    authenticate,
    authenticate_key,
    create_account,
    hash_key,
    issue_key,
    key_owner,
)
from broker.auth import SIGNED_IN
from broker.db import utcnow
from broker.errors import BrokerError, Conflict, InvalidInput
from broker.models.account import Account, ApiKey, Role
from broker.models.node import Node


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


def test_browser_sessions_follow_the_key(db: Session) -> None:
    def sign_in(key: str) -> tuple[Account, str] | None:
        try:
            caller = SIGNED_IN.admit_key(key, authenticate_key(db, key))
        except BrokerError:
            return None
        assert caller.key_id is not None
        return caller.account, caller.key_id

    def session_account(key_id: str) -> Account | None:
        owner = key_owner(db, key_id)
        return None if owner is None else SIGNED_IN.admit(owner).account

    account, key = create_account(db, "dora", Role.provider)
    signed = sign_in(key)
    assert signed is not None
    assert signed[0] == account
    assert session_account(signed[1]) == account
    # A node key is its agent's, never a person's session.
    node = Node(
        id="node_1", provider_id=account.id, name="box", region="r", country="NL", lat=0, lon=0
    )
    db.add(node)
    db.flush()
    node_key = issue_key(db, account, node_id=node.id)
    assert authenticate(db, node_key) == account
    assert sign_in(node_key) is None
    assert sign_in(key + "x") is None
    # Revoking the key ends the session; so does disabling the account.
    db.get_one(ApiKey, signed[1]).revoked_at = utcnow()
    assert session_account(signed[1]) is None
    _, second = create_account(db, "erin", Role.developer)
    other = sign_in(second)
    assert other is not None
    other[0].disabled_at = utcnow()
    assert session_account(other[1]) is None
    assert sign_in(second) is None
