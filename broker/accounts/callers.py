"""Who a request acts for, and what a role may do: plain data and checks, no HTTP.

``broker.auth`` finds the caller of a request (its API key); services take the
``Caller`` (or ``Agent``) it gives and use these checks.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.errors import Forbidden
from broker.models.account import Account, Role


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


def own_key(caller: Caller) -> Account:
    if caller.node_id is not None:
        raise NodeKeyNotAllowed(
            f"this is node {caller.node_id}'s key: it acts only for that node (heartbeats, "
            "offers, allocations and the files its jobs need); use the provider's own API "
            "key for this"
        )
    return caller.account


def check_role(account: Account, *roles: Role) -> Account:
    """``account`` if it has one of ``roles`` (admins always pass); Forbidden otherwise."""
    allowed = {*roles, Role.admin}
    if account.role not in allowed:
        names = " or ".join(sorted(r.value for r in allowed))
        yours = account.role.value
        raise Forbidden(f"this needs {_a(names)} {names} account; yours is {_a(yours)} {yours}")
    return account


def _a(word: str) -> str:
    """The article before ``word``: an admin, a developer."""
    return "an" if word[:1] in "aeiou" else "a"
