"""Account and API-key operations. Functions take the session and never commit."""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Sequence

from sqlalchemy import bindparam, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker.accounts.models import Account, ApiKey, Role
from broker.db import new_id
from broker.errors import Conflict, InvalidInput

KEY_PREFIX = "bk_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,99}$")


def hash_key(key: str) -> str:
    # Keys carry 256 random bits, so a fast digest is enough: nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()


def create_account(session: Session, name: str, role: Role) -> tuple[Account, str]:
    """Create an account and its first API key; returns the key in clear, once."""
    name = name.strip()
    if not NAME_PATTERN.match(name):
        raise InvalidInput(
            "name must be 1-100 characters: letters, digits, space, '.', '_', '@' or '-', "
            "starting with a letter or digit",
            field="name",
        )
    taken = Conflict(f"an account named {name!r} already exists", field="name")
    if session.scalar(select(Account.id).where(Account.name == name)) is not None:
        raise taken
    account = Account(id=new_id("acc"), name=name, role=role)
    try:
        # Two concurrent creations can both pass the check; the unique index decides.
        with session.begin_nested():
            session.add(account)
            session.flush()
    except IntegrityError:
        raise taken from None
    return account, issue_key(session, account)


def issue_key(session: Session, account: Account, *, node_id: str | None = None) -> str:
    """A new API key for ``account``; with ``node_id``, a node key for its agent."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(
            id=new_id("key"),
            account_id=account.id,
            prefix=key[:10],
            key_hash=hash_key(key),
            node_id=node_id,
        )
    )
    session.flush()
    return key


def authenticate(session: Session, key: str) -> Account | None:
    """The enabled account that owns an unrevoked ``key``, or None."""
    found = authenticate_key(session, key)
    return found[0] if found else None


# Built once: every request runs it, and building a statement costs as much as running it.
_BY_KEY_HASHES = (
    select(ApiKey.key_hash, Account, ApiKey.node_id)
    .join(ApiKey, ApiKey.account_id == Account.id)
    .where(
        ApiKey.key_hash.in_(bindparam("key_hashes", expanding=True)),
        ApiKey.revoked_at.is_(None),
        Account.disabled_at.is_(None),
    )
)

KeyOwner = tuple[Account, str | None]


def authenticate_key(session: Session, key: str) -> KeyOwner | None:
    """The enabled account that owns an unrevoked ``key`` and the node the key is
    bound to (None for an account's own keys), or None."""
    return authenticate_keys(session, [key])[0]


def authenticate_keys(session: Session, keys: Sequence[str]) -> list[KeyOwner | None]:
    """``authenticate_key`` for each of ``keys``, in one query."""
    hashes = [
        hash_key(key) if key.startswith(KEY_PREFIX) and len(key) <= 200 else None for key in keys
    ]
    wanted = sorted({h for h in hashes if h is not None})
    if not wanted:
        return [None] * len(keys)
    rows = session.execute(_BY_KEY_HASHES, {"key_hashes": wanted})
    owners: dict[str, KeyOwner] = {row[0]: (row[1], row[2]) for row in rows}
    return [owners.get(h) if h is not None else None for h in hashes]


def list_accounts(session: Session, *, limit: int, offset: int) -> tuple[list[Account], int]:
    total = session.scalar(select(func.count()).select_from(Account)) or 0
    rows = session.scalars(
        select(Account).order_by(Account.created_at, Account.id).limit(limit).offset(offset)
    ).all()
    return list(rows), total


def sign_in(session: Session, key: str) -> tuple[Account, str] | None:
    """For a browser session: the enabled account that owns ``key`` and the key's id,
    or None. Node keys are refused: they belong to one node's agent, not to a person."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    row = session.execute(
        select(Account, ApiKey.id)
        .join(ApiKey, ApiKey.account_id == Account.id)
        .where(
            ApiKey.key_hash == hash_key(key),
            ApiKey.revoked_at.is_(None),
            ApiKey.node_id.is_(None),
            Account.disabled_at.is_(None),
        )
    ).first()
    return (row[0], row[1]) if row else None


def session_account(session: Session, key_id: str) -> Account | None:
    """The account behind a browser session signed in with key ``key_id``, while that
    key is unrevoked and the account enabled: revoking the key ends the session."""
    return session.scalar(
        select(Account)
        .join(ApiKey, ApiKey.account_id == Account.id)
        .where(
            ApiKey.id == key_id,
            ApiKey.revoked_at.is_(None),
            ApiKey.node_id.is_(None),
            Account.disabled_at.is_(None),
        )
    )
