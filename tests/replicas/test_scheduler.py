"""The scheduler: each task runs in one process at a time per database, and another
takes over when its holder stops or dies."""

from __future__ import annotations

import itertools
import time

import pytest
from sqlalchemy import Engine

from broker import periodic
from broker.config import Settings
from broker.scheduler import Scheduler, Task

Log = list[tuple[str, float, float]]


class Recorder:
    """A task that records who ran it, from when to when."""

    def __init__(self, holder: str, log: Log) -> None:
        self.holder, self.log = holder, log

    def __call__(self) -> None:
        start = time.monotonic()
        time.sleep(0.03)
        self.log.append((self.holder, start, time.monotonic()))


def schedulers(engine: Engine, n: int, log: Log) -> list[Scheduler]:
    return [
        Scheduler(
            lambda: engine,
            [Task("task", 0.05, Recorder(f"s{i}", log), jitter=0.5, first_delay=0)],
            lease_seconds=0.6,
            holder=f"s{i}",
        )
        for i in range(n)
    ]


def test_a_task_runs_in_one_process_at_a_time_and_moves_when_its_holder_stops(
    fresh_engine: Engine,
) -> None:
    log: Log = []
    group = schedulers(fresh_engine, 3, log)
    for s in group:
        s.start()
    time.sleep(1.0)
    holders = {h for h, _, _ in log}
    assert len(holders) == 1, holders  # the lease stays with whoever took it
    leader = next(s for s in group if s.holder in holders)
    leader.stop()  # gives the lease up: another takes over on its next tick
    stopped = time.monotonic()
    time.sleep(0.6)
    others = [s for s in group if s is not leader]
    for s in others:
        s.stop()
    after = [(h, start) for h, start, _ in log if start > stopped]
    assert after
    assert all(h != leader.holder for h, _ in after)
    assert after[0][1] - stopped < 0.4  # no wait for the lease to expire
    spans = sorted((start, end) for _, start, end in log)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # never overlap
    assert sum(s.runs["task"] for s in group) == len(log) > 10


def test_a_holder_that_dies_is_replaced_once_its_lease_expires(fresh_engine: Engine) -> None:
    log: Log = []
    first, second = schedulers(fresh_engine, 2, log)
    first.start()
    time.sleep(0.3)
    second.start()
    time.sleep(0.3)
    assert {h for h, _, _ in log} == {"s0"}
    first.stopping.set()  # dies: it stops ticking and keeps its lease
    died = time.monotonic()
    time.sleep(1.2)
    second.stop()
    taken = [start for h, start, _ in log if h == "s1"]
    assert taken, "nobody took over"
    assert 0.3 < taken[0] - died < 1.0  # after the 0.6 s lease ran out, not before


def test_task_names_are_unique() -> None:
    task = Task("a", 1, lambda: None)
    with pytest.raises(ValueError, match="unique"):
        Scheduler(lambda: None, [task, task])  # type: ignore[arg-type,return-value]


def test_the_broker_registers_clearing_sweeps_and_billing() -> None:
    settings = Settings(clear_interval_seconds=3, billing_interval_seconds=60, node_timeout_s=8)
    names = {t.name: t for t in periodic.tasks(settings)}
    assert set(names) == {"clearing", "sweep", "billing"}
    assert all(t.once_per_database and t.jitter > 0 for t in names.values())
    assert names["sweep"].interval == 2.0
    # The clearing task's leader holds on through a round as long as its time limit.
    assert names["clearing"].lease_for(settings.lease_seconds) >= (
        3 * settings.clear_time_limit_seconds
    )
    off = Settings(clear_interval_seconds=0, billing_interval_seconds=0)
    assert {t.name for t in periodic.tasks(off)} == {"sweep"}
    assert {t.name for t in periodic.tasks(settings, clearing=False, billing=False)} == {"sweep"}
