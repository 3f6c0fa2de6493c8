"""Who is calling: one configurable dependency, ``Authenticator``, for every route.

Every way in (the API's routes, the busy routes' batched key checks, the
submission batch, the dashboard's session cookie) finds the key's owner and then
asks the same ``Authenticator.admit`` whether it may call: a node key only where
node keys are admitted, then the role. Only *where* the key is looked up
differs (``Source``): in the request's transaction, in a short one of its own
(uploads, long polls), or in a batch with other requests' keys."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import BackgroundTasks, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from broker.accounts.callers import Agent, Caller, check_role, own_key
from broker.accounts.service import (
    KeyOwner,
    authenticate_key,
    authenticate_keys,
    due_for_touch,
    hash_key,
    touch_keys,
)
from broker.coalesce import Batched
from broker.db import SessionDep, Transactions, TransactionsDep
from broker.errors import Unauthorized
from broker.models.account import Account, Role
from broker.ratelimit import forget_key, remember_key

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer bk_...`")


Source = Literal["request", "streaming", "batched"]


def _checked(key: str, found: KeyOwner | None) -> KeyOwner:
    """The key's owner; Unauthorized if it has none. Tells the rate limiter whose
    bucket the key's requests count against (or that they count per address again)."""
    if found is None:
        forget_key(hash_key(key))
        raise Unauthorized("the API key is unknown or revoked, or its account is disabled")
    identity = f"node:{found.node_id}" if found.node_id else f"account:{found.account.id}"
    remember_key(found.key_hash, identity)
    return found


def _key(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None:
        raise Unauthorized("send an API key: 'Authorization: Bearer <key>'")
    return credentials.credentials


# Keys of concurrent requests checked together, in one query, in a transaction shared
# with other batched work; and when they were last used, written in the same batches.
_key_checks: Batched[str, KeyOwner | None] = Batched(authenticate_keys, write=False)
_key_uses: Batched[str, None] = Batched(touch_keys, write=True)


def _touch_now(transactions: Transactions, key_id: str) -> None:
    """Record a key's use after the response (a failure loses nothing but the time)."""
    try:
        with transactions() as session:
            touch_keys(session, [key_id])
    except Exception:
        log.warning("could not record that key %s was used", key_id, exc_info=True)


async def _touch_batched(transactions: Transactions, owner: KeyOwner) -> None:
    if due_for_touch(owner):
        try:
            await _key_uses.submit(transactions, owner.key_id)
        except Exception:
            log.warning("could not record that key %s was used", owner.key_id, exc_info=True)


def _known(request: Request, owner: KeyOwner) -> KeyOwner:
    request.state.account_id = owner.account.id  # for the access log (never the key)
    return owner


# Where a request's key is looked up: each gives the key's owner (Unauthorized if it
# has none) and records that the key was used. FastAPI runs a dependency once per
# request, so a route with two ``Authenticator`` dependencies looks its key up once.
def _request_owner(
    request: Request,
    session: SessionDep,
    transactions: TransactionsDep,
    background: BackgroundTasks,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> KeyOwner:
    key = _key(credentials)
    owner = _checked(key, authenticate_key(session, key))
    if due_for_touch(owner):  # after the response, outside the request's transaction
        background.add_task(_touch_now, transactions, owner.key_id)
    return _known(request, owner)


def _streaming_owner(
    request: Request,
    transactions: TransactionsDep,
    background: BackgroundTasks,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> KeyOwner:
    """Checked in a short transaction of its own: for uploads, which stream their body
    before they touch the database and must not hold a session meanwhile, and long polls."""
    key = _key(credentials)
    with transactions(write=False) as session:
        owner = _checked(key, authenticate_key(session, key))
    if due_for_touch(owner):
        background.add_task(_touch_now, transactions, owner.key_id)
    return _known(request, owner)


async def _batched_owner(
    request: Request,
    transactions: TransactionsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> KeyOwner:
    """Checked together with other requests' keys (one query for all the keys that
    arrived meanwhile), outside the request's own transaction: for the busiest
    endpoints. The account it gives is detached: read it, do not change it."""
    return await _owner_in_batch(request, transactions, _key(credentials))


async def _owner_in_batch(request: Request, transactions: Transactions, key: str) -> KeyOwner:
    owner = _checked(key, await _key_checks.submit(transactions, key))
    await _touch_batched(transactions, owner)
    return _known(request, owner)


_SOURCES: dict[Source, Any] = {
    "request": _request_owner,
    "streaming": _streaming_owner,
    "batched": _batched_owner,
}


class Authenticator:
    """Who may call a route: ``roles`` (admins always pass; none: any role), whether a
    node key may (``node_keys``: the route acts for one node, and gets the ``Caller``
    with its ``node_id``; otherwise it gets the ``Account`` and node keys are
    refused), and where the key is looked up (``source``).

    ``dependency`` is the route dependency; ``admit`` is the rule itself, for a key
    looked up elsewhere (the submission batch, the dashboard's session).
    """

    def __init__(self, *roles: Role, node_keys: bool = False, source: Source = "request") -> None:
        self.roles = roles
        self.node_keys = node_keys
        self.source = source
        owner_dep = _SOURCES[source]

        # async: no I/O here, so FastAPI runs it on the event loop instead of a thread.
        async def dependency(owner: KeyOwner = Depends(owner_dep)) -> Caller | Account:
            caller = self.admit(owner)
            return caller if node_keys else caller.account

        self.dependency = dependency

    def admit(self, owner: KeyOwner) -> Caller:
        """The caller ``owner`` authenticates, if this route admits it: NodeKeyNotAllowed
        or Forbidden otherwise."""
        caller = Caller(owner.account, owner.node_id, owner.key_id)
        if not self.node_keys:
            own_key(caller)
        if self.roles:
            check_role(caller.account, *self.roles)
        return caller

    def admit_key(self, key: str, found: KeyOwner | None) -> Caller:
        """``admit`` for a key looked up by the caller (None: no such key, Unauthorized)."""
        return self.admit(_checked(key, found))

    async def admit_batched(self, request: Request, transactions: Transactions, key: str) -> Caller:
        """``admit`` for a handler that read the key itself (``bearer_key``), the key
        checked in a batch as the ``batched`` source does."""
        return self.admit(await _owner_in_batch(request, transactions, key))


async def bearer_key(request: Request) -> str | None:
    """The key of the request's ``Authorization: Bearer <key>`` header, read as the
    routes' ``HTTPBearer`` reads it; None if there is none."""
    credentials = await _bearer(request)
    return None if credentials is None else credentials.credentials


CurrentAccount = Annotated[Account, Depends(Authenticator().dependency)]
StreamingAccount = Annotated[Account, Depends(Authenticator(source="streaming").dependency)]
Developer = Annotated[Account, Depends(Authenticator(Role.developer).dependency)]
Provider = Annotated[Account, Depends(Authenticator(Role.provider).dependency)]
Admin = Annotated[Account, Depends(Authenticator(Role.admin).dependency)]
# CurrentAccount and Developer with the key checked in a batch.
BATCHED_ACCOUNT = Authenticator(source="batched")
BATCHED_DEVELOPER = Authenticator(Role.developer, source="batched")
BatchedAccount = Annotated[Account, Depends(BATCHED_ACCOUNT.dependency)]
BatchedDeveloper = Annotated[Account, Depends(BATCHED_DEVELOPER.dependency)]
# Any caller, a node key included (it may fetch the files its node's jobs need).
CallerDep = Annotated[Caller, Depends(Authenticator(node_keys=True).dependency)]
StreamingCaller = Annotated[
    Caller, Depends(Authenticator(node_keys=True, source="streaming").dependency)
]
# Node agents (or providers themselves) reporting on the work they run; the
# streaming one is checked in a short transaction, for long polls.
AgentDep = Annotated[Agent, Depends(Authenticator(Role.provider, node_keys=True).dependency)]
StreamingAgent = Annotated[
    Agent, Depends(Authenticator(Role.provider, node_keys=True, source="streaming").dependency)
]
# The dashboard: a person signed in with one of their own keys, any role.
SIGNED_IN = Authenticator()
