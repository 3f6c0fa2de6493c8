"""Rate limits shared through PostgreSQL: N processes together hold one caller's limit."""

from __future__ import annotations

import multiprocessing
import time

import pytest
from sqlalchemy import Engine

from broker.buckets import DatabaseBuckets, MemoryBuckets
from broker.config import Settings
from broker.db import make_engine

RATE, BURST, SECONDS, PROCESSES = 20.0, 10, 2.0, 4


def _hammer(url: str, start: float, granted: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    engine = make_engine(url)
    buckets = DatabaseBuckets(lambda: engine)
    got = 0
    while time.time() < start:
        time.sleep(0.001)
    while time.time() < start + SECONDS:
        if buckets.take("account:shared", RATE, BURST) == 0:
            got += 1
    granted.put(got)
    engine.dispose()


def test_n_processes_together_hold_one_limit(fresh_engine: Engine) -> None:
    if fresh_engine.dialect.name != "postgresql":
        pytest.skip("shared rate limits live in PostgreSQL (scripts/with-postgres.sh)")
    url = fresh_engine.url.render_as_string(hide_password=False)
    context = multiprocessing.get_context("spawn")
    granted: multiprocessing.Queue[int] = context.Queue()
    start = time.time() + 3.0  # every process connected and ready before it
    workers = [
        context.Process(target=_hammer, args=(url, start, granted)) for _ in range(PROCESSES)
    ]
    for w in workers:
        w.start()
    counts = [granted.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(10)
    allowed = BURST + RATE * SECONDS  # what one caller may send in the window, in all
    assert all(c > 0 for c in counts), counts  # every process got a share
    assert sum(counts) <= allowed + RATE * 0.2, counts  # the few ms of start-up skew
    assert sum(counts) >= allowed * 0.8, counts  # and the limit is reachable
    # Per process, each would have had the whole allowance: PROCESSES times as much.


def test_the_rate_is_refilled_and_the_wait_is_told(fresh_engine: Engine) -> None:
    if fresh_engine.dialect.name != "postgresql":
        pytest.skip("shared rate limits live in PostgreSQL (scripts/with-postgres.sh)")
    buckets = DatabaseBuckets(lambda: fresh_engine)
    assert [buckets.take("address:1.2.3.4", 2.0, 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = buckets.take("address:1.2.3.4", 2.0, 3)
    assert 0 < wait <= 0.5
    assert buckets.take("address:5.6.7.8", 2.0, 3) == 0  # another caller, its own bucket
    time.sleep(wait + 0.05)
    assert buckets.take("address:1.2.3.4", 2.0, 3) == 0


def test_memory_buckets_are_the_embedded_default() -> None:
    assert not Settings(database_url="sqlite:///x.db").shared_rate_limits
    assert Settings(database_url="postgresql://u@h/db").shared_rate_limits
    assert not Settings(
        database_url="postgresql://u@h/db", rate_limit_store="memory"
    ).shared_rate_limits
    memory = MemoryBuckets()
    assert [memory.take("a", 1.0, 2) for _ in range(2)] == [0.0, 0.0]
    assert memory.take("a", 1.0, 2) > 0
