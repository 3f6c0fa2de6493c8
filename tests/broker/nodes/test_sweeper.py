"""Node sweeps pause while the database is unreachable and give every node one full
timeout after it answers again."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.exc import OperationalError, ProgrammingError

from broker.nodes.sweeper import Sweeper


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _down() -> Any:
    raise OperationalError("SELECT 1", {}, Exception("connection refused"))


def test_sweeps_wait_a_timeout_after_start_and_after_an_outage() -> None:
    clock = Clock()
    sweeper = Sweeper(60.0, clock)
    swept: list[float] = []

    def sweep() -> int:
        swept.append(clock.now)
        return 0

    def up() -> None:
        return None

    assert sweeper.tick(up, sweep) is None  # the server just started
    clock.now += 61
    assert sweeper.tick(up, sweep) == 0
    # The database goes away for longer than the node timeout: no sweep meanwhile.
    for _ in range(30):
        clock.now += 5
        assert sweeper.tick(_down, sweep) is None
    assert sweeper.down_since is not None
    # It answers again: every node gets one full timeout before the next sweep.
    clock.now += 5
    back = clock.now
    assert sweeper.tick(up, sweep) is None
    clock.now = back + 59
    assert sweeper.tick(up, sweep) is None
    clock.now = back + 61
    assert sweeper.tick(up, sweep) == 0
    assert swept == [1061.0, back + 61]


def test_a_sweep_that_loses_the_database_counts_as_an_outage() -> None:
    clock = Clock()
    sweeper = Sweeper(10.0, clock)
    clock.now += 11
    assert sweeper.tick(lambda: None, _down) is None
    assert sweeper.down_since is not None
    assert sweeper.tick(lambda: None, lambda: 3) is None  # back: a full timeout first
    clock.now += 11
    assert sweeper.tick(lambda: None, lambda: 3) == 3


def test_other_database_errors_are_not_outages() -> None:
    clock = Clock()
    sweeper = Sweeper(1.0, clock)
    clock.now += 2

    def broken() -> int:
        raise ProgrammingError("SELECT nonsense", {}, Exception("syntax error"))

    with pytest.raises(ProgrammingError):
        sweeper.tick(lambda: None, broken)
    assert sweeper.down_since is None
