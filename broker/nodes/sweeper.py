"""When the node sweep may judge heartbeats: never while the database is unreachable,
and only one full node timeout after it (or the server) comes back.

An outage longer than the node timeout leaves every heartbeat stale: agents
kept running but could not report. Sweeping then would hand the whole fleet's
jobs back to the market (and fail those on their last attempt). So the server's
sweep loop asks the database first; while it does not answer, sweeps pause, and
once it answers again every node gets one full timeout to report in before the
next sweep judges it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

log = logging.getLogger(__name__)

T = TypeVar("T")


def unreachable(error: BaseException) -> bool:
    """Whether a database error means the database could not be reached."""
    if isinstance(error, OperationalError | InterfaceError):
        return True
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)


class Sweeper:
    """The sweep loop's memory of outages. ``tick`` runs ``sweep`` when it may."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        # The server just started: agents that kept running get one timeout to report in.
        self.resume_at = clock() + timeout_s
        self.down_since: float | None = None

    def tick(self, probe: Callable[[], object], sweep: Callable[[], T]) -> T | None:
        """``probe`` the database, then ``sweep`` unless the database is down or has not
        been back for a full timeout; returns what ``sweep`` did, or None."""
        try:
            probe()
        except DBAPIError as e:
            self._down(e)
            return None
        now = self._clock()
        if self.down_since is not None:
            log.warning(
                "the database answers again after %.0f s; node sweeps resume in %g s, so "
                "every node has a full timeout to report in",
                now - self.down_since,
                self.timeout_s,
            )
            self.down_since = None
            self.resume_at = max(self.resume_at, now + self.timeout_s)
        if now < self.resume_at:
            return None
        try:
            return sweep()
        except DBAPIError as e:
            if not unreachable(e):
                raise
            self._down(e)
            return None

    def _down(self, error: BaseException) -> None:
        if self.down_since is None:
            self.down_since = self._clock()
            log.error(
                "the database is unreachable (%s); node sweeps pause until it answers",
                str(error).splitlines()[0][:200],
            )
