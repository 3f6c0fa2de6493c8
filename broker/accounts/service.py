"""Account and API-key operations. Functions take the session and never commit."""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker.accounts.visibility import sees_all
from broker.db import new_id, utcnow
from broker.errors import Conflict, Forbidden, InvalidInput, NotFound
from broker.models.account import Account, ApiKey, Role

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
    return _issue(session, account.id, node_id)[1]


def _issue(session: Session, account_id: str, node_id: str | None = None) -> tuple[ApiKey, str]:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id("key"),
        account_id=account_id,
        prefix=key[:10],
        key_hash=hash_key(key),
        node_id=node_id,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row, key


def authenticate(session: Session, key: str) -> Account | None:
    """The enabled account that owns an unrevoked ``key``, or None."""
    found = authenticate_key(session, key)
    return found[0] if found else None


# Built once: every request runs it, and building a statement costs as much as running it.
_BY_KEY_HASHES = (
    select(ApiKey.key_hash, Account, ApiKey.node_id, ApiKey.id, ApiKey.last_used_at)
    .join(ApiKey, ApiKey.account_id == Account.id)
    .where(
        ApiKey.key_hash.in_(bindparam("key_hashes", expanding=True)),
        ApiKey.revoked_at.is_(None),
        Account.disabled_at.is_(None),
    )
)


class KeyOwner(NamedTuple):
    """Who a key authenticates: the account, the node a node key acts for (None for the
    account's own keys), and the key's row (its id and when it was last used)."""

    account: Account
    node_id: str | None
    key_id: str
    key_hash: str
    last_used_at: datetime | None


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
    owners = {row[0]: KeyOwner(row[1], row[2], row[3], row[0], row[4]) for row in rows}
    return [owners.get(h) if h is not None else None for h in hashes]


def account_names(
    session: Session, ids: Iterable[str] | None = None, role: Role | None = None
) -> dict[str, str]:
    """Account names by id: of ``ids``, or of every account (with ``role``, those of it
    only), for pages that show people names rather than ids."""
    stmt = select(Account.id, Account.name).order_by(Account.name)
    if ids is not None:
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        stmt = stmt.where(Account.id.in_(wanted))
    if role is not None:
        stmt = stmt.where(Account.role == role)
    return {account_id: name for account_id, name in session.execute(stmt.limit(10_000))}


def list_accounts(session: Session, *, limit: int, offset: int) -> tuple[list[Account], int]:
    total = session.scalar(select(func.count()).select_from(Account)) or 0
    rows = session.scalars(
        select(Account).order_by(Account.created_at, Account.id).limit(limit).offset(offset)
    ).all()
    return list(rows), total


def key_owner(session: Session, key_id: str) -> KeyOwner | None:
    """``authenticate_key`` by the key's id, for a browser session signed in with it:
    None once the key is revoked or its account disabled, so revoking the key ends the
    session. Whether the owner may sign in at all is ``broker.auth``'s to say."""
    row = session.execute(
        select(ApiKey.key_hash, Account, ApiKey.node_id, ApiKey.id, ApiKey.last_used_at)
        .join(ApiKey, ApiKey.account_id == Account.id)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None), Account.disabled_at.is_(None))
    ).first()
    return KeyOwner(row[1], row[2], row[3], row[0], row[4]) if row else None


# ---- managing keys and accounts -----------------------------------------------------


def _manageable(session: Session, viewer: Account, account_id: str | None) -> Account:
    """The account whose keys ``viewer`` manages: its own, or (admins) any."""
    if account_id is None or account_id == viewer.id:
        return viewer
    if _limited(viewer):
        raise Forbidden("only admins manage other accounts' keys", field="account_id")
    account = session.get(Account, account_id)
    if account is None:
        raise NotFound(f"no account {account_id!r}", field="account_id")
    return account


def list_keys(
    session: Session, viewer: Account, account_id: str | None = None, *, revoked: bool = True
) -> list[ApiKey]:
    """The keys of ``viewer`` (admins: of ``account_id``), newest first, its nodes'
    keys included; with ``revoked`` False, only those still valid."""
    account = _manageable(session, viewer, account_id)
    stmt = select(ApiKey).where(ApiKey.account_id == account.id)
    if not revoked:
        stmt = stmt.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(stmt.order_by(ApiKey.created_at.desc(), ApiKey.id).limit(1000)))


def create_key(
    session: Session, viewer: Account, account_id: str | None = None
) -> tuple[ApiKey, str]:
    """A new key for ``viewer`` (admins: for ``account_id``); the key in clear, once."""
    account = _manageable(session, viewer, account_id)
    return _issue(session, account.id)


def _own_key(session: Session, viewer: Account | None, key_id: str) -> ApiKey:
    stmt = select(ApiKey).where(ApiKey.id == key_id).with_for_update()
    key = session.scalar(stmt)
    if key is None or (_limited(viewer) and key.account_id != getattr(viewer, "id", None)):
        raise NotFound(f"no API key {key_id!r} of yours")
    return key


def _limited(viewer: Account | None) -> bool:
    """Whether ``viewer`` manages only its own keys: None is the operator (the ``broker``
    command, with the database at hand), who manages all, as admins do."""
    return not sees_all(viewer)


def revoke_key(session: Session, viewer: Account | None, key_id: str) -> ApiKey:
    """Revoke a key of ``viewer``'s (admins: any). It is refused from the next request
    on, in every process (keys are checked against the database on every request), and
    the dashboard sessions signed in with it end. Revoking it again changes nothing.

    An account may not revoke its last own key itself (it could not sign in again):
    it creates or rotates one first; an admin may."""
    key = _own_key(session, viewer, key_id)
    if key.revoked_at is not None:
        return key
    if key.node_id is None and _limited(viewer):
        others = session.scalar(
            select(func.count())
            .select_from(ApiKey)
            .where(
                ApiKey.account_id == key.account_id,
                ApiKey.node_id.is_(None),
                ApiKey.revoked_at.is_(None),
                ApiKey.id != key.id,
            )
        )
        if not others:
            raise Conflict(
                "this is your account's last API key: create another (POST /v1/keys) or "
                "rotate this one (POST /v1/keys/{id}/rotate) instead",
                field="key_id",
            )
    key.revoked_at = utcnow()
    session.flush()
    return key


def rotate_key(session: Session, viewer: Account | None, key_id: str) -> tuple[ApiKey, str]:
    """Revoke a key and issue its replacement, at once; the new key in clear, once.
    Node keys are replaced by registering the node again, not here."""
    key = _own_key(session, viewer, key_id)
    if key.node_id is not None:
        raise InvalidInput(
            f"key {key_id} is node {key.node_id}'s: its agent gets a new one when it "
            "registers again; revoke this one to stop it",
            field="key_id",
        )
    if key.revoked_at is not None:
        raise Conflict(f"key {key_id} is revoked already: create a new key instead")
    key.revoked_at = utcnow()
    return _issue(session, key.account_id)


def set_disabled(
    session: Session, admin: Account | None, account_id: str, disabled: bool
) -> Account:
    """Disable an account (every key of it, its nodes' included, is refused from the next
    request on, and its dashboard sessions end) or enable it again; admins (or the
    operator: None) only. Disabling twice keeps the first time."""
    if _limited(admin):
        raise Forbidden("only admins disable or enable accounts")
    account = session.scalar(select(Account).where(Account.id == account_id).with_for_update())
    if account is None:
        raise NotFound(f"no account {account_id!r}")
    if disabled and admin is not None and account.id == admin.id:
        raise Conflict("an admin cannot disable its own account; ask another admin")
    if disabled and account.disabled_at is None:
        account.disabled_at = utcnow()
    elif not disabled:
        account.disabled_at = None
    session.flush()
    return account


def find_account(session: Session, name_or_id: str) -> Account:
    """An account by its name or id (for the CLI)."""
    account = session.scalar(
        select(Account).where((Account.name == name_or_id) | (Account.id == name_or_id))
    )
    if account is None:
        raise NotFound(f"no account named {name_or_id!r}")
    return account


# ---- when keys were last used ---------------------------------------------------------

# A key's last use is written at most this often (per key and process): a write per
# request would cost the busiest requests a round trip each.
KEY_USE_RESOLUTION = timedelta(minutes=1)
_touched: dict[str, float] = {}
_touched_lock = threading.Lock()


def due_for_touch(owner: KeyOwner, now: datetime | None = None) -> bool:
    """Whether the key's ``last_used_at`` is older than ``KEY_USE_RESOLUTION`` and no
    request of this process has written it meanwhile; True claims the write."""
    last = owner.last_used_at
    if last is not None and (now or utcnow()) - last < KEY_USE_RESOLUTION:
        return False
    seconds = KEY_USE_RESOLUTION.total_seconds()
    with _touched_lock:
        at = time.monotonic()
        if at - _touched.get(owner.key_id, -seconds) < seconds:
            return False
        if len(_touched) > 100_000:
            _touched.clear()
        _touched[owner.key_id] = at
    return True


def touch_keys(session: Session, key_ids: Sequence[str]) -> list[None]:
    """Record that the keys were used now."""
    if key_ids:
        session.execute(
            update(ApiKey)
            .where(ApiKey.id.in_(sorted(set(key_ids))))
            .values(last_used_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return [None] * len(key_ids)
