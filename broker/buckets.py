"""Where the rate limiter's token buckets live: in this process, or in the database.

A bucket holds up to ``burst`` tokens and refills at ``rate`` a second; a request
takes one. ``take`` returns 0 when it got one, else the seconds until one is free.

- ``MemoryBuckets``: in this process (the embedded default, SQLite): with N worker
  processes a caller may send up to N times its rate in total.
- ``DatabaseBuckets``: one row per caller in PostgreSQL, refilled and taken from in
  one statement (an upsert), on the database's clock: every worker of every replica
  shares it, so a caller gets its rate in total. The table is UNLOGGED (no WAL: a
  crash of the database forgets the buckets, which refill anyway).

The ``limits`` library was considered: it keeps windows in Redis, Memcached or
MongoDB, not in a SQL database, and the broker's one shared store is PostgreSQL.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from sqlalchemy import Engine, text

log = logging.getLogger(__name__)

_MAX_BUCKETS = 100_000  # the least recently used are forgotten past this


class Buckets(Protocol):
    shared: bool  # whether take() talks to the database (and so runs off the event loop)

    def take(self, who: str, rate: float, burst: int) -> float:
        """Take a token from ``who``'s bucket; 0, or the seconds until one is free."""
        ...


class MemoryBuckets:
    shared = False

    def __init__(self) -> None:
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, who: str, rate: float, burst: int) -> float:
        with self._lock:
            now = time.monotonic()
            tokens, last = self._buckets.pop(who, (float(burst), now))
            tokens = min(float(burst), tokens + (now - last) * rate)
            if tokens >= 1:
                self._buckets[who] = (tokens - 1, now)
                wait = 0.0
            else:
                self._buckets[who] = (tokens, now)
                wait = _wait(tokens, rate)
            if len(self._buckets) > _MAX_BUCKETS:
                self._buckets.popitem(last=False)
            return wait


# The refill is computed from the row as it is (locked by the upsert); a token is
# taken only when one is there, and ``granted`` says whether it was.
_REFILL = "LEAST(CAST(:burst AS float8), b.tokens + GREATEST(0, EXCLUDED.stamp - b.stamp) * :rate)"
_TAKE = text(
    f"""
    INSERT INTO rate_buckets AS b (key, tokens, stamp, granted)
    VALUES (:key, CAST(:burst AS float8) - 1, extract(epoch FROM clock_timestamp()), true)
    ON CONFLICT (key) DO UPDATE SET
        tokens = CASE WHEN {_REFILL} >= 1 THEN {_REFILL} - 1 ELSE {_REFILL} END,
        granted = {_REFILL} >= 1,
        stamp = EXCLUDED.stamp
    RETURNING b.tokens, b.granted
    """  # noqa: S608 - no input in the f-string, only the fixed refill expression
)


class DatabaseBuckets:
    """Buckets in PostgreSQL's ``rate_buckets``: one autocommitted statement a request."""

    shared = True

    def __init__(self, engine: Callable[[], Engine]) -> None:
        self._engine = engine
        self._autocommit: Engine | None = None

    def take(self, who: str, rate: float, burst: int) -> float:
        if self._autocommit is None:  # made on first use: the engine is made lazily too
            self._autocommit = self._engine().execution_options(isolation_level="AUTOCOMMIT")
        try:
            with self._autocommit.connect() as conn:
                tokens, granted = conn.execute(
                    _TAKE, {"key": who, "burst": burst, "rate": rate}
                ).one()
        except Exception:
            # The database is what the request needs anyway; its own error says more.
            log.warning("the shared rate limit could not be read; letting the request by")
            return 0.0
        return 0.0 if granted else _wait(float(tokens), rate)


def _wait(tokens: float, rate: float) -> float:
    return (1 - tokens) / rate if rate > 0 else 3600.0
