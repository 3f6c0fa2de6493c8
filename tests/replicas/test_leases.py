"""Leases and the fenced clearing commit, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, select

from broker import leases
from broker.config import Settings
from broker.db import transaction, utcnow
from broker.leases import LeaseLost
from broker.market import clearing
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.lease import Lease
from broker.models.market import Allocation
from broker.models.offer import Offer
from solver import Market, Result, Warm, solve
from tests.broker.market.test_clearing import accounts, check_invariants, seed
from tests.factories import make_job, make_offer

SETTINGS = Settings(clear_time_limit_seconds=5, lease_seconds=30)


def expire(engine: Engine, name: str) -> None:
    """The holder stalled past its lease (paused, partitioned, starved)."""
    with transaction(engine) as s:
        s.get_one(Lease, name).expires_at = utcnow() - timedelta(seconds=1)


def test_one_holder_at_a_time_and_a_new_token_each_time_it_changes_hands(
    fresh_engine: Engine,
) -> None:
    assert leases.acquire(fresh_engine, "x", "a", 60) == 1
    assert leases.acquire(fresh_engine, "x", "b", 60) is None
    assert leases.acquire(fresh_engine, "x", "a", 60) == 1  # renewed: the same token
    expire(fresh_engine, "x")
    assert leases.acquire(fresh_engine, "x", "b", 60) == 2
    assert leases.acquire(fresh_engine, "x", "a", 60) is None  # a's renewal comes too late
    assert leases.current(fresh_engine, "x", "b") == 2
    leases.release(fresh_engine, "x", "a", 1)  # a stale release changes nothing
    assert leases.acquire(fresh_engine, "x", "a", 60) is None
    leases.release(fresh_engine, "x", "b", 2)
    assert leases.current(fresh_engine, "x", "b") is None
    assert leases.acquire(fresh_engine, "x", "a", 60) == 3


def test_a_fenced_write_with_a_stale_token_is_rolled_back(fresh_engine: Engine) -> None:
    provider, _ = accounts(fresh_engine)
    offer = seed(fresh_engine, lambda s: make_offer(s, provider, count=4))
    old = leases.acquire(fresh_engine, "y", "a", 60)
    assert old is not None
    expire(fresh_engine, "y")
    assert leases.acquire(fresh_engine, "y", "b", 60) == old + 1

    def stale_write() -> None:
        with transaction(fresh_engine) as s:
            leases.fence(s, "y", old)
            s.get_one(Offer, offer.id).count = 0

    with pytest.raises(LeaseLost):
        stale_write()
    with transaction(fresh_engine, write=False) as s:
        assert s.get_one(Offer, offer.id).count == 4
    with transaction(fresh_engine) as s:  # the holder's own token passes
        leases.fence(s, "y", old + 1)


def test_a_stale_clearing_leader_commits_nothing(fresh_engine: Engine) -> None:
    """The round's leader stalls during its solve; its lease expires and another process
    takes it over. Its matches, computed and valid, must not be committed."""
    provider, developer = accounts(fresh_engine)
    offer = seed(fresh_engine, lambda s: make_offer(s, provider, count=4))
    for _ in range(3):
        seed(fresh_engine, lambda s: make_job(s, developer, accelerators=1))
    taken: list[int | None] = []

    def stalled(market: Market, limit: float, warm: Warm | None = None) -> Result:
        result = solve(market, time_limit=limit, warm=warm)
        assert result.assignments  # there was something to commit
        expire(fresh_engine, clearing.ROUND_LEASE)
        taken.append(leases.acquire(fresh_engine, clearing.ROUND_LEASE, "replica-b", 60))
        return result

    record = clearing.run_round(fresh_engine, SETTINGS, "manual", stalled)
    assert taken == [2]
    assert record is not None
    assert record.status == "failed"
    assert "lease" in (record.error or "")
    with transaction(fresh_engine, write=False) as s:
        assert s.scalar(select(func.count(Allocation.id))) == 0
        assert {j.state for j in s.scalars(select(Job))} == {JobState.open}
    # While replica b holds the lease no round starts; once it lets go, one does.
    with pytest.raises(clearing.RoundInProgress):
        clearing.run_round(fresh_engine, SETTINGS, "manual")
    leases.release(fresh_engine, clearing.ROUND_LEASE, "replica-b", 2)
    record = clearing.run_round(fresh_engine, SETTINGS, "manual")
    assert record is not None
    assert record.matched == 3
    check_invariants(fresh_engine, {offer.id: 4})


def test_a_round_killed_mid_way_is_closed_by_the_next_leader(fresh_engine: Engine) -> None:
    """A leader SIGKILLed mid-round leaves its lease and a running round behind: the
    next round waits for the lease to expire, then marks that round failed."""
    from broker.models.market import ClearingRound

    provider, developer = accounts(fresh_engine)
    seed(fresh_engine, lambda s: make_offer(s, provider, count=2))
    seed(fresh_engine, lambda s: make_job(s, developer, accelerators=1))
    assert leases.acquire(fresh_engine, clearing.ROUND_LEASE, "dead", 60) == 1
    dead_round = ClearingRound(id="rnd_dead", trigger="auto", status="running")
    seed(fresh_engine, lambda s: s.add(dead_round))
    with pytest.raises(clearing.RoundInProgress):
        clearing.run_round(fresh_engine, SETTINGS)
    expire(fresh_engine, clearing.ROUND_LEASE)
    record = clearing.run_round(fresh_engine, SETTINGS)
    assert record is not None
    assert record.matched == 1
    with transaction(fresh_engine, write=False) as s:
        dead = s.get_one(ClearingRound, "rnd_dead")
        assert dead.status == "failed"
        assert "interrupted" in (dead.error or "")
