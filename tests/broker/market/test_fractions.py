"""Fractional matches against a real database: MIG instances and shares handed out
by clearing rounds, priced at their share, never sold twice, and handed back."""

from __future__ import annotations

import random
from collections import Counter
from decimal import Decimal

from sqlalchemy import Engine, select

from broker.db import transaction
from broker.ledger import end_job
from broker.market import clearing
from broker.models.account import Account
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.market import Allocation, AllocationStatus
from broker.models.offer import Offer
from solver.fractions import parse_shares
from tests.broker.market.test_clearing import SETTINGS, accounts, seed
from tests.factories import make_job, make_offer


def _allocations(engine: Engine) -> dict[str, Allocation]:
    with transaction(engine, write=False) as s:
        rows = s.scalars(select(Allocation).where(Allocation.status == AllocationStatus.active))
        return {a.job_id: a for a in rows}


def _offer(engine: Engine, offer_id: str) -> Offer:
    with transaction(engine, write=False) as s:
        return s.get_one(Offer, offer_id)


def _finish(engine: Engine, job_id: str) -> None:
    with transaction(engine) as s:
        end_job(s, s.get_one(Job, job_id), JobState.cancelled)


def _shared_offer(engine: Engine, provider: Account, count: int = 1, shares: int = 4) -> str:
    offer = seed(
        engine,
        lambda s: make_offer(
            s,
            provider,
            kind="shared",
            count=count,
            shares=shares,
            memory_per_share_gib=80 / shares,
            price_per_hour="2.00",
        ),
    )
    return str(offer.id)


def test_shares_of_one_accelerator_are_sold_once_at_their_share(fresh_engine: Engine) -> None:
    provider, developer = accounts(fresh_engine)
    offer_id = _shared_offer(fresh_engine, provider)
    jobs = [
        seed(
            fresh_engine,
            lambda s: make_job(
                s, developer, accelerators=0.5, accepts_shared=True, duration_hours=2
            ),
        ).id
        for _ in range(3)
    ]
    record = clearing.run_round(fresh_engine, SETTINGS)
    assert record is not None
    assert record.matched == 2
    held = _allocations(fresh_engine)
    assert sorted(a.slice or "" for a in held.values()) == ["2/4 shared on GPU 0"] * 2
    for a in held.values():
        assert (a.share_num, a.share_den) == (1, 2)
        # Half of the 2.00 ask for the estimated 2 hours.
        assert a.compute_micros == 2_000_000
    offer = _offer(fresh_engine, offer_id)
    assert (offer.count, offer.shares_busy) == (0, 4)
    waiting = next(j for j in jobs if j not in held)

    first = next(iter(held))
    _finish(fresh_engine, first)
    offer = _offer(fresh_engine, offer_id)
    # The other half still runs: the accelerator stays taken, two shares come back.
    assert (offer.count, offer.shares_busy) == (0, 2)
    assert clearing.run_round(fresh_engine, SETTINGS) is not None
    held = _allocations(fresh_engine)
    assert waiting in held
    assert held[waiting].slice == "2/4 shared on GPU 0"
    for job_id in list(held):
        _finish(fresh_engine, job_id)
    offer = _offer(fresh_engine, offer_id)
    assert (offer.count, offer.shares_busy) == (1, 0)


def test_a_whole_job_takes_every_share_of_a_free_accelerator_only(
    fresh_engine: Engine,
) -> None:
    provider, developer = accounts(fresh_engine)
    offer_id = _shared_offer(fresh_engine, provider)
    half = seed(
        fresh_engine,
        lambda s: make_job(s, developer, accelerators=0.5, accepts_shared=True, duration_hours=1),
    ).id
    seed(
        fresh_engine,
        lambda s: make_job(s, developer, accelerators=0.25, duration_hours=1),  # not shared
    )
    record = clearing.run_round(fresh_engine, SETTINGS)
    assert record is not None
    assert record.matched == 1
    assert list(_allocations(fresh_engine)) == [half]

    # A whole job waits while a share of the accelerator is held...
    whole = seed(
        fresh_engine, lambda s: make_job(s, developer, accelerators=1, duration_hours=1)
    ).id
    record = clearing.run_round(fresh_engine, SETTINGS)
    assert record is not None
    assert record.matched == 0
    # ... and takes all of it, at the whole price, once none is.
    _finish(fresh_engine, half)
    record = clearing.run_round(fresh_engine, SETTINGS)
    assert record is not None
    assert record.matched == 1
    held = _allocations(fresh_engine)[whole]
    assert held.slice == "4/4 shared on GPU 0"
    assert (held.share_num, held.share_den) == (1, 1)
    assert held.compute_micros == 2_000_000
    offer = _offer(fresh_engine, offer_id)
    assert (offer.count, offer.shares_busy) == (0, 4)
    _finish(fresh_engine, whole)
    offer = _offer(fresh_engine, offer_id)
    assert (offer.count, offer.shares_busy) == (1, 0)


def test_mig_instances_are_handed_out_by_placement(fresh_engine: Engine) -> None:
    provider, developer = accounts(fresh_engine)
    offer = seed(
        fresh_engine,
        lambda s: make_offer(s, provider, kind="mig", count=1, price_per_hour="7.00"),
    )
    jobs = [
        seed(
            fresh_engine,
            lambda s: make_job(
                s,
                developer,
                mig_profile="3g.40gb",
                accelerator_models=["h100-sxm"],
                duration_hours=1,
                max_price_per_hour="9.00",
            ),
        ).id
        for _ in range(3)
    ]
    record = clearing.run_round(fresh_engine, SETTINGS)
    assert record is not None
    assert record.matched == 2
    held = _allocations(fresh_engine)
    assert sorted(a.slice or "" for a in held.values()) == ["3g.40gb@0", "3g.40gb@4"]
    for a in held.values():
        assert (a.share_num, a.share_den) == (3, 7)
        assert a.compute_micros == 3_000_000  # 3/7 of 7.00 for an hour
    row = _offer(fresh_engine, offer.id)
    assert (row.count, sorted(row.mig_busy), row.mig_instances) == (
        1,
        ["3g.40gb@0", "3g.40gb@4"],
        [],
    )
    first = next(iter(held))
    freed = held[first].slice
    _finish(fresh_engine, first)
    row = _offer(fresh_engine, offer.id)
    assert row.mig_instances == [freed]
    assert clearing.run_round(fresh_engine, SETTINGS) is not None
    held = _allocations(fresh_engine)
    assert set(held) == set(jobs) - {first}
    assert sorted(a.slice or "" for a in held.values()) == ["3g.40gb@0", "3g.40gb@4"]


def test_shares_are_never_oversold_over_rounds(fresh_engine: Engine) -> None:
    """Random fractional jobs over rounds that finish some of them: no accelerator's
    shares over its count, and the free count is the accelerators no share of which
    is held."""
    rng = random.Random(23)
    provider, developer = accounts(fresh_engine)
    offer_id = _shared_offer(fresh_engine, provider, count=3, shares=8)
    for _ in range(5):
        for _ in range(rng.randint(2, 6)):
            fraction = Decimal(rng.choice([125, 250, 375, 500, 810])) / 1000
            seed(
                fresh_engine,
                lambda s, f=fraction: make_job(
                    s, developer, accelerators=float(f), accepts_shared=True, duration_hours=1
                ),
            )
        clearing.run_round(fresh_engine, SETTINGS)
        held = _allocations(fresh_engine)
        load: Counter[int] = Counter()
        for a in held.values():
            k, total, gpu = parse_shares(a.slice or "")
            assert total == 8
            assert 0 <= gpu < 3
            load[gpu] += k
        assert all(n <= 8 for n in load.values()), load
        offer = _offer(fresh_engine, offer_id)
        assert offer.count == 3 - len(load)
        assert offer.shares_busy == sum(load.values())
        for job_id in rng.sample(sorted(held), k=len(held) // 2):
            _finish(fresh_engine, job_id)
