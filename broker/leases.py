"""Leases: "at most one holder at a time per database", on SQLite and PostgreSQL alike.

A lease is a row: its name, who holds it, until when, and a **token** that grows by
one each time the lease changes hands. Whoever takes it gets the new token and
writes with it: a write that must not come from a stale holder (a clearing round's
matches) checks the token in its own transaction (``fence``), so a holder that
lost the lease while it worked (paused, partitioned, its lease expired and another
process took over) has its writes rejected instead of committed beside the new
holder's. Safety rests on the token alone; the expiry (this process's clock) only
decides when a lease that nobody renews may be taken over, so replicas' clocks
need only be roughly right (NTP).

The lease row is read ``FOR UPDATE`` (PostgreSQL; SQLite serialises writers), so a
take-over and a fenced commit are ordered: either the commit sees the new token
and is rolled back, or the take-over waits for the commit and follows it.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker.db import transaction, utcnow
from broker.errors import Conflict
from broker.models.lease import Lease


class LeaseLost(Conflict):
    """The lease this write was fenced by has passed to another holder."""

    code = "lease_lost"


def holder_id() -> str:
    """A name for this process that no other process, here or on another machine, has."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def acquire(engine: Engine, name: str, holder: str, seconds: float) -> int | None:
    """Take or renew lease ``name`` for ``seconds``; returns the token, or None when
    another holder's lease has not expired.

    Renewing (the same holder, its lease not taken over since) keeps the token;
    taking a lease, new or expired, makes a new one.
    """
    now = utcnow()
    until = now + timedelta(seconds=seconds)
    try:
        with transaction(engine) as session:
            lease = session.scalars(
                select(Lease).where(Lease.name == name).with_for_update()
            ).one_or_none()
            if lease is None:
                session.add(Lease(name=name, holder=holder, token=1, expires_at=until))
                return 1
            if lease.holder != holder:
                if lease.expires_at > now:
                    return None
                lease.holder, lease.token = holder, lease.token + 1
            lease.expires_at = until
            return lease.token
    except IntegrityError:  # another process created the row first: it holds the lease
        return None


def release(engine: Engine, name: str, holder: str, token: int) -> None:
    """Give lease ``name`` up now, if ``holder`` still holds it with ``token``."""
    with transaction(engine) as session:
        lease = session.scalars(
            select(Lease).where(Lease.name == name).with_for_update()
        ).one_or_none()
        if lease is not None and lease.holder == holder and lease.token == token:
            lease.expires_at = utcnow() - timedelta(microseconds=1)


def current(engine: Engine, name: str, holder: str) -> int | None:
    """The token of lease ``name`` if ``holder`` holds it (unexpired), else None."""
    with transaction(engine, write=False) as session:
        lease = session.get(Lease, name)
        if lease is None or lease.holder != holder or lease.expires_at <= utcnow():
            return None
        return lease.token


def fence(session: Session, name: str, token: int) -> None:
    """Raise ``LeaseLost`` unless lease ``name`` still has ``token``; call it first in
    the transaction whose writes it guards, which then holds the lease row locked."""
    current = session.scalar(select(Lease.token).where(Lease.name == name).with_for_update())
    if current != token:
        raise LeaseLost(
            f"the {name!r} lease passed to another holder (token {current}, this one had "
            f"{token}); its writes were rolled back"
        )


@contextmanager
def held(
    engine: Engine, name: str, seconds: float, holder: str | None = None
) -> Iterator[int | None]:
    """``with held(engine, name, seconds) as token``: the lease for the block (token), or
    None when another holder has it; released at the end."""
    holder = holder or holder_id()
    token = acquire(engine, name, holder, seconds)
    try:
        yield token
    finally:
        if token is not None:
            release(engine, name, holder, token)
