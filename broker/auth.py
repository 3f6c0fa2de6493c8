"""Who is calling: the bearer-key dependency and role checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from broker.accounts.models import Account, Role
from broker.accounts.service import authenticate, authenticate_key
from broker.db import SessionDep, TransactionsDep
from broker.errors import Forbidden, Unauthorized

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer bk_...`")


def current_account(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Account:
    if credentials is None:
        raise Unauthorized("send an API key: 'Authorization: Bearer <key>'")
    account = authenticate(session, credentials.credentials)
    if account is None:
        raise Unauthorized("the API key is unknown or revoked")
    request.state.account_id = account.id  # for the access log (never the key)
    return account


CurrentAccount = Annotated[Account, Depends(current_account)]


def streaming_account(
    request: Request,
    transactions: TransactionsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Account:
    """The caller, checked in a short transaction of its own: for uploads, which stream
    their body before they touch the database and must not hold a session meanwhile."""
    if credentials is None:
        raise Unauthorized("send an API key: 'Authorization: Bearer <key>'")
    with transactions(write=False) as session:
        account = authenticate(session, credentials.credentials)
    if account is None:
        raise Unauthorized("the API key is unknown or revoked")
    request.state.account_id = account.id
    return account


StreamingAccount = Annotated[Account, Depends(streaming_account)]


def require_role(*roles: Role) -> Callable[[Account], Account]:
    """A dependency that admits only the given roles (admins always pass)."""

    def check(account: CurrentAccount) -> Account:
        return check_role(account, *roles)

    return check


def check_role(account: Account, *roles: Role) -> Account:
    """``account`` if it has one of ``roles`` (admins always pass); Forbidden otherwise."""
    allowed = {*roles, Role.admin}
    if account.role not in allowed:
        names = " or ".join(sorted(r.value for r in allowed))
        raise Forbidden(f"this needs a {names} account; yours is a {account.role.value}")
    return account


@dataclass(frozen=True, slots=True)
class Agent:
    """A provider calling as the agent of one node (a node key), or as itself
    (``node_id`` None: its own key, which acts for offers listed by hand)."""

    account: Account
    node_id: str | None


def _agent(session: Session, credentials: HTTPAuthorizationCredentials | None) -> Agent:
    if credentials is None:
        raise Unauthorized("send an API key: 'Authorization: Bearer <key>'")
    found = authenticate_key(session, credentials.credentials)
    if found is None:
        raise Unauthorized("the API key is unknown or revoked")
    check_role(found[0], Role.provider)
    return Agent(*found)


def current_agent(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Agent:
    return _agent(session, credentials)


def streaming_agent(
    transactions: TransactionsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Agent:
    with transactions(write=False) as session:
        return _agent(session, credentials)


Developer = Annotated[Account, Depends(require_role(Role.developer))]
Provider = Annotated[Account, Depends(require_role(Role.provider))]
Admin = Annotated[Account, Depends(require_role(Role.admin))]
# Node agents (or providers themselves) reporting on the work they run; the
# streaming one is checked in a short transaction, for long polls.
AgentDep = Annotated[Agent, Depends(current_agent)]
StreamingAgent = Annotated[Agent, Depends(streaming_agent)]
