"""Who is calling: the bearer-key dependency and role checks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from broker.accounts.models import Account, Role
from broker.accounts.service import KeyOwner, authenticate_key, authenticate_keys
from broker.coalesce import Batched
from broker.db import SessionDep, Transactions, TransactionsDep
from broker.errors import Forbidden, Unauthorized

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


# A provider calling as the agent of one node (a node key), or as itself (its own
# key, which acts for offers listed by hand).
Agent = Caller


def _caller(session: Session, credentials: HTTPAuthorizationCredentials | None) -> Caller:
    return _known(authenticate_key(session, _key(credentials)))


def _key(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None:
        raise Unauthorized("send an API key: 'Authorization: Bearer <key>'")
    return credentials.credentials


def _known(found: KeyOwner | None) -> Caller:
    if found is None:
        raise Unauthorized("the API key is unknown or revoked")
    return Caller(*found)


# Keys of concurrent requests checked together, in one query, in a transaction shared
# with other batched work.
_key_checks: Batched[str, KeyOwner | None] = Batched(authenticate_keys, write=False)


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
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    caller = _caller(session, credentials)
    request.state.account_id = caller.account.id  # for the access log (never the key)
    return caller


def streaming_caller(
    request: Request,
    transactions: TransactionsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The caller, checked in a short transaction of its own: for uploads, which stream
    their body before they touch the database and must not hold a session meanwhile."""
    with transactions(write=False) as session:
        caller = _caller(session, credentials)
    request.state.account_id = caller.account.id
    return caller


async def batched_caller(
    request: Request,
    transactions: TransactionsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The caller, its key checked together with other requests' keys (one query for
    all the keys that arrived meanwhile), outside the request's own transaction:
    for the busiest endpoints. The account it gives is detached: read it, do not
    change it."""
    caller = _known(await _key_checks.submit(transactions, _key(credentials)))
    request.state.account_id = caller.account.id
    return caller


async def bearer_key(request: Request) -> str | None:
    """The key of the request's ``Authorization: Bearer <key>`` header, read as the
    routes' ``HTTPBearer`` reads it; None if there is none."""
    credentials = await _bearer(request)
    return None if credentials is None else credentials.credentials


async def batched_account_for(request: Request, transactions: Transactions, key: str) -> Account:
    """``BatchedAccount`` for a handler that read the key itself (``bearer_key``): the
    key checked in a batch, node keys refused."""
    caller = _known(await _key_checks.submit(transactions, key))
    request.state.account_id = caller.account.id
    return _own_key(caller)


def developer_of(found: KeyOwner | None) -> Account:
    """The developer (or admin) account behind one of its own keys, as
    ``BatchedDeveloper`` admits it: Unauthorized, NodeKeyNotAllowed or Forbidden
    otherwise. For work that checks its key in a batch of its own
    (``broker.jobs.intake.submit_with_key``)."""
    return check_role(_own_key(_known(found)), Role.developer)


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
        raise Forbidden(f"this needs a {names} account; yours is a {account.role.value}")
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
