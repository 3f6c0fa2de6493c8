"""Who is calling: the bearer-key dependency and role checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from broker.accounts.models import Account, Role
from broker.accounts.service import authenticate
from broker.db import SessionDep
from broker.errors import Forbidden, Unauthorized

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer bk_...`")


def current_account(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Account:
    if credentials is None:
        raise Unauthorized("send an API key: 'Authorization: Bearer <key>'")
    account = authenticate(session, credentials.credentials)
    if account is None:
        raise Unauthorized("the API key is unknown or revoked")
    return account


CurrentAccount = Annotated[Account, Depends(current_account)]


def require_role(*roles: Role) -> Callable[[Account], Account]:
    """A dependency that admits only the given roles (admins always pass)."""
    allowed = {*roles, Role.admin}

    def check(account: CurrentAccount) -> Account:
        if account.role not in allowed:
            names = " or ".join(sorted(r.value for r in allowed))
            raise Forbidden(f"this needs a {names} account; yours is a {account.role.value}")
        return account

    return check


Developer = Annotated[Account, Depends(require_role(Role.developer))]
Provider = Annotated[Account, Depends(require_role(Role.provider))]
Admin = Annotated[Account, Depends(require_role(Role.admin))]
