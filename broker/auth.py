"""Who is calling: the bearer-key dependency and role checks."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import BackgroundTasks, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

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
from broker.errors import Forbidden, Unauthorized
from broker.models.account import Account, Role
from broker.ratelimit import forget_key, remember_key

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer bk_...`")


class NodeKeyNotAllowed(Forbidden):
    code = "node_key_not_allowed"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the account behind the key and, for a node key, the node the
    key acts for (``node_id`` None: one of the account's own keys).

    A node key authenticates as its provider but may act only for its node: the
    node's heartbeats, offers and allocations (``AgentDep``), and the files the jobs
    on it need (``CallerDep``). Every other endpoint refuses it (``CurrentAccount``).
    """

    account: Account
    node_id: str | None
    key_id: str | None = None


# A provider calling as the agent of one node (a node key), or as itself (its own
# key, which acts for offers listed by hand).
Agent = Caller


def _owner(session: Session, credentials: HTTPAuthorizationCredentials | None) -> KeyOwner:
    key = _key(credentials)
    return _checked(key, authenticate_key(session, key))


def _key(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None:
        raise Unauthorized("send an API key: 'Authorization: Bearer <key>'")
    return credentials.credentials


def _checked(key: str, found: KeyOwner | None) -> KeyOwner:
    """The key's owner; Unauthorized if it has none. Tells the rate limiter whose
    bucket the key's requests count against (or that they count per address again)."""
    if found is None:
        forget_key(hash_key(key))
        raise Unauthorized("the API key is unknown or revoked, or its account is disabled")
    identity = f"node:{found.node_id}" if found.node_id else f"account:{found.account.id}"
    remember_key(found.key_hash, identity)
    return found


def _caller_of(owner: KeyOwner) -> Caller:
    return Caller(owner.account, owner.node_id, owner.key_id)


def _known(key: str, found: KeyOwner | None) -> Caller:
    return _caller_of(_checked(key, found))


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


def _own_key(caller: Caller) -> Account:
    if caller.node_id is not None:
        raise NodeKeyNotAllowed(
            f"this is node {caller.node_id}'s key: it acts only for that node (heartbeats, "
            "offers, allocations and the files its jobs need); use the provider's own API "
            "key for this"
        )
    return caller.account


def current_caller(
    request: Request,
    session: SessionDep,
    transactions: TransactionsDep,
    background: BackgroundTasks,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    owner = _owner(session, credentials)
    if due_for_touch(owner):  # after the response, outside the request's transaction
        background.add_task(_touch_now, transactions, owner.key_id)
    request.state.account_id = owner.account.id  # for the access log (never the key)
    return _caller_of(owner)


def streaming_caller(
    request: Request,
    transactions: TransactionsDep,
    background: BackgroundTasks,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The caller, checked in a short transaction of its own: for uploads, which stream
    their body before they touch the database and must not hold a session meanwhile."""
    with transactions(write=False) as session:
        owner = _owner(session, credentials)
    if due_for_touch(owner):
        background.add_task(_touch_now, transactions, owner.key_id)
    request.state.account_id = owner.account.id
    return _caller_of(owner)


async def batched_caller(
    request: Request,
    transactions: TransactionsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The caller, its key checked together with other requests' keys (one query for
    all the keys that arrived meanwhile), outside the request's own transaction:
    for the busiest endpoints. The account it gives is detached: read it, do not
    change it."""
    key = _key(credentials)
    owner = _checked(key, await _key_checks.submit(transactions, key))
    await _touch_batched(transactions, owner)
    request.state.account_id = owner.account.id
    return _caller_of(owner)


async def bearer_key(request: Request) -> str | None:
    """The key of the request's ``Authorization: Bearer <key>`` header, read as the
    routes' ``HTTPBearer`` reads it; None if there is none."""
    credentials = await _bearer(request)
    return None if credentials is None else credentials.credentials


async def batched_account_for(request: Request, transactions: Transactions, key: str) -> Account:
    """``BatchedAccount`` for a handler that read the key itself (``bearer_key``): the
    key checked in a batch, node keys refused."""
    owner = _checked(key, await _key_checks.submit(transactions, key))
    await _touch_batched(transactions, owner)
    request.state.account_id = owner.account.id
    return _own_key(_caller_of(owner))


def developer_of(key: str, found: KeyOwner | None) -> Account:
    """The developer (or admin) account behind one of its own keys, as
    ``BatchedDeveloper`` admits it: Unauthorized, NodeKeyNotAllowed or Forbidden
    otherwise. For work that checks its key in a batch of its own
    (``broker.jobs.intake.submit_with_key``)."""
    return check_role(_own_key(_known(key, found)), Role.developer)


# The wrappers below do no I/O: async, so FastAPI runs them on the event loop rather
# than sending each to a worker thread.
async def current_account(caller: Annotated[Caller, Depends(current_caller)]) -> Account:
    """The account behind one of its own keys (node keys are refused)."""
    return _own_key(caller)


async def streaming_account(caller: Annotated[Caller, Depends(streaming_caller)]) -> Account:
    return _own_key(caller)


CurrentAccount = Annotated[Account, Depends(current_account)]
StreamingAccount = Annotated[Account, Depends(streaming_account)]
CallerDep = Annotated[Caller, Depends(current_caller)]
StreamingCaller = Annotated[Caller, Depends(streaming_caller)]


def require_role(*roles: Role) -> Callable[[Account], Awaitable[Account]]:
    """A dependency that admits only the given roles (admins always pass)."""

    # async: no I/O here, so FastAPI runs it on the event loop instead of a thread.
    async def check(account: CurrentAccount) -> Account:
        return check_role(account, *roles)

    return check


def check_role(account: Account, *roles: Role) -> Account:
    """``account`` if it has one of ``roles`` (admins always pass); Forbidden otherwise."""
    allowed = {*roles, Role.admin}
    if account.role not in allowed:
        names = " or ".join(sorted(r.value for r in allowed))
        yours = account.role.value
        raise Forbidden(f"this needs {_a(names)} {names} account; yours is {_a(yours)} {yours}")
    return account


def _agent(caller: Caller) -> Agent:
    check_role(caller.account, Role.provider)
    return caller


async def current_agent(caller: CallerDep) -> Agent:
    return _agent(caller)


async def streaming_agent(caller: StreamingCaller) -> Agent:
    return _agent(caller)


async def _batched_developer(caller: Annotated[Caller, Depends(batched_caller)]) -> Account:
    return check_role(_own_key(caller), Role.developer)


async def _batched_account(caller: Annotated[Caller, Depends(batched_caller)]) -> Account:
    return _own_key(caller)


Developer = Annotated[Account, Depends(require_role(Role.developer))]
# CurrentAccount and Developer with the key checked in a batch (``batched_caller``).
BatchedAccount = Annotated[Account, Depends(_batched_account)]
BatchedDeveloper = Annotated[Account, Depends(_batched_developer)]
Provider = Annotated[Account, Depends(require_role(Role.provider))]
Admin = Annotated[Account, Depends(require_role(Role.admin))]
# Node agents (or providers themselves) reporting on the work they run; the
# streaming one is checked in a short transaction, for long polls.
AgentDep = Annotated[Agent, Depends(current_agent)]
StreamingAgent = Annotated[Agent, Depends(streaming_agent)]


def _a(word: str) -> str:
    """The article before ``word``: an admin, a developer."""
    return "an" if word[:1] in "aeiou" else "a"
