"""Automatic rounds that remember the standing book (``broker.market.standing``):
they read only what changed, leave out the jobs no offer can take, and wake them
when something could change that; never a different answer for it."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, event, select

from broker.billing.service import set_fee
from broker.config import Settings
from broker.db import transaction
from broker.jobs.service import change_bid
from broker.ledger import end_job
from broker.market import clearing
from broker.market.adapt import weights
from broker.market.standing import Standing
from broker.models.account import Account, Role
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.offer import Offer, OfferStatus
from broker.offers.schemas import OfferUpdate
from broker.offers.service import update_offer, withdraw_offer
from solver import Market, Result, Warm, placeable, solve
from tests.broker.market.test_clearing import accounts, check_invariants, seed
from tests.factories import make_account, make_job, make_offer

SETTINGS = Settings(clear_time_limit_seconds=5, fee_percent=Decimal(0))


def auto(engine: Engine, standing: Standing) -> Any:
    return clearing.run_round(engine, SETTINGS, "auto", None, standing)


def states(engine: Engine, *jobs: Job) -> list[str]:
    with transaction(engine, write=False) as s:
        return [s.get_one(Job, j.id).state.value for j in jobs]


def test_jobs_no_offer_can_take_are_left_out_and_not_read_again(fresh_engine: Engine) -> None:
    provider, developer = accounts(fresh_engine)
    seed(fresh_engine, lambda s: make_offer(s, provider, price_per_hour="2.50", count=1))
    seed(fresh_engine, lambda s: make_offer(s, provider, price_per_hour="9.00", count=8))
    first, second = (seed(fresh_engine, lambda s: make_job(s, developer)) for _ in range(2))
    low = seed(fresh_engine, lambda s: make_job(s, developer, max_price_per_hour="1.00"))
    standing = Standing()

    record = auto(fresh_engine, standing)
    assert (record.matched, record.jobs_considered) == (1, 3)
    # The bid under every ask is left out at once; the job that found the offer
    # full, once a round has seen it full.
    assert standing.dormant == {low.id}
    record = auto(fresh_engine, standing)  # the other job, against what is left
    assert (record.matched, record.jobs_considered) == (0, 2)
    assert standing.dormant == {low.id, second.id}
    assert auto(fresh_engine, standing) is None  # nothing an offer could take
    assert states(fresh_engine, first, second, low) == ["matched", "open", "open"]

    statements: list[str] = []
    event.listen(fresh_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    assert auto(fresh_engine, standing) is None
    reads = [s for s in statements if "FROM jobs" in s or "FROM offers" in s]
    assert len(reads) == 2  # ids and versions only
    assert all("jobs.platforms" not in s and "offers.lat" not in s for s in reads), reads


@pytest.mark.parametrize(
    "change",
    ["new offer", "offer repriced", "capacity freed", "capacity raised", "bid raised", "fee cut"],
)
def test_a_change_that_could_place_a_left_out_job_wakes_it(
    fresh_engine: Engine, change: str
) -> None:
    provider, developer = accounts(fresh_engine)
    admin = seed(fresh_engine, lambda s: make_account(s, Role.admin)[0])
    if change == "fee cut":
        seed(fresh_engine, lambda s: set_fee(s, s.get_one(Account, admin.id), Decimal(50)))
    # The waiting job is kept out by the holder, which takes the one accelerator,
    # or with room to spare by its price or its budget.
    by_price = change in ("offer repriced", "bid raised")
    count = 2 if by_price or change == "fee cut" else 1
    offer = seed(fresh_engine, lambda s: make_offer(s, provider, count=count))
    holder = seed(fresh_engine, lambda s: make_job(s, developer))
    # 2 h at $2.50 is $5.00, $7.50 with a 50 % fee: over the $6 budget.
    budget = {"budget_usd": "6.00"} if change == "fee cut" else {}
    bid = "2.00" if by_price else "3.00"
    waiting = seed(fresh_engine, lambda s: make_job(s, developer, max_price_per_hour=bid, **budget))
    standing = Standing()
    auto(fresh_engine, standing)
    assert auto(fresh_engine, standing) is None
    assert states(fresh_engine, holder, waiting) == ["matched", "open"]
    assert waiting.id in standing.dormant

    with transaction(fresh_engine) as s:
        owner, dev = s.get_one(Account, provider.id), s.get_one(Account, developer.id)
        if change == "new offer":
            make_offer(s, owner, price_per_hour="2.90", count=1)
        elif change == "offer repriced":
            update_offer(s, owner, offer.id, OfferUpdate(price_per_hour=Decimal("1.90")))
        elif change == "capacity freed":
            end_job(s, s.get_one(Job, holder.id), JobState.cancelled)
        elif change == "capacity raised":
            update_offer(s, owner, offer.id, OfferUpdate(capacity=2))
        elif change == "bid raised":
            change_bid(s, dev, waiting.id, Decimal("2.60"))
        else:
            set_fee(s, s.get_one(Account, admin.id), Decimal(0))

    record = auto(fresh_engine, standing)
    assert record is not None
    assert record.matched >= 1
    assert states(fresh_engine, waiting) == ["matched"]
    assert waiting.id not in standing.dormant


def test_an_offer_that_grows_but_cannot_take_them_leaves_them_out(fresh_engine: Engine) -> None:
    provider, developer = accounts(fresh_engine)
    seed(fresh_engine, lambda s: make_offer(s, provider, price_per_hour="2.50", count=1))
    low = seed(fresh_engine, lambda s: make_job(s, developer, max_price_per_hour="1.00"))
    standing = Standing()
    assert auto(fresh_engine, standing).matched == 0
    assert standing.dormant == {low.id}
    seed(fresh_engine, lambda s: make_offer(s, provider, price_per_hour="1.50", count=4))
    assert auto(fresh_engine, standing) is None  # checked against the new offer only
    assert standing.dormant == {low.id}


def test_left_out_jobs_are_always_ones_no_offer_can_take(fresh_engine: Engine) -> None:
    """Random changes to a small market between rounds. After every round: the
    remembered book is the book read afresh, every job left out has no offer it
    could go to (every rule), and capacity is never oversold."""
    rng = random.Random(8)
    provider, developer = accounts(fresh_engine)
    listed: dict[str, int] = {}
    standing = Standing()
    regions = [("europe-west4", "NL", 53.4, 6.8), ("us-east-1", "US", 39.0, -77.5)]

    def new_offer(s: Any) -> None:
        region, country, lat, lon = rng.choice(regions)
        count = rng.randint(1, 4)
        o = make_offer(
            s,
            s.get_one(Account, provider.id),
            price_per_hour=f"{rng.uniform(1, 4):.2f}",
            count=count,
            region=region,
            country=country,
            lat=lat,
            lon=lon,
        )
        listed[o.id] = count

    def new_job(s: Any) -> None:
        make_job(
            s,
            s.get_one(Account, developer.id),
            accelerators=rng.choice([1, 1, 2, 3]),
            max_price_per_hour=f"{rng.uniform(1, 4):.2f}",
            latency_slo_ms=rng.choice([None, None, 20]),
            user_lat=52.0,
            user_lon=5.0,
        )

    def reprice(s: Any) -> None:
        active = s.scalars(select(Offer).where(Offer.status == OfferStatus.active)).all()
        if active:
            change = OfferUpdate(price_per_hour=Decimal(f"{rng.uniform(1, 4):.2f}"))
            update_offer(s, s.get_one(Account, provider.id), rng.choice(active).id, change)

    def rebid(s: Any) -> None:
        open_jobs = s.scalars(select(Job).where(Job.state == JobState.open)).all()
        if open_jobs:
            price = Decimal(f"{rng.uniform(1, 4):.2f}")
            change_bid(s, s.get_one(Account, developer.id), rng.choice(open_jobs).id, price)

    def finish(s: Any) -> None:
        held = s.scalars(select(Job).where(Job.state == JobState.matched)).all()
        if held:
            end_job(s, rng.choice(held), rng.choice([JobState.cancelled, JobState.open]))

    def withdraw(s: Any) -> None:
        active = s.scalars(select(Offer).where(Offer.status == OfferStatus.active)).all()
        if len(active) > 2:
            withdraw_offer(s, s.get_one(Account, provider.id), rng.choice(active).id)

    with transaction(fresh_engine) as s:
        for _ in range(3):
            new_offer(s)
        for _ in range(12):
            new_job(s)
    changes = [new_offer, new_job, new_job, reprice, rebid, finish, finish, withdraw]
    for _ in range(25):
        with transaction(fresh_engine) as s:
            for change in rng.sample(changes, rng.randint(0, 3)):
                change(s)
        auto(fresh_engine, standing)
        with transaction(fresh_engine, write=False) as s:
            fresh, _ = Standing().read(s, weights(SETTINGS, 0))
            remembered, _ = standing.read(s, weights(SETTINGS, 0))
        assert remembered == fresh
        left_out = tuple(j for j in fresh.jobs if j.id in standing.dormant)
        assert placeable(Market(offers=fresh.offers, jobs=left_out)) == frozenset()
        check_invariants(fresh_engine, listed)
    assert standing.dormant  # the walk did leave jobs out


def test_a_round_with_gangs_hands_its_lp_to_the_next(fresh_engine: Engine) -> None:
    """The solver's warm start reaches the server's rounds: the next automatic
    round's solve is given the LP working set and prices of the last one."""
    provider, developer = accounts(fresh_engine)
    for _ in range(3):
        seed(fresh_engine, lambda s: make_offer(s, provider, price_per_hour="2.50", count=8))
    for size in (8, 4, 4, 2, 8, 8):
        seed(fresh_engine, lambda s, n=size: make_job(s, developer, accelerators=n))
    given: list[object] = []

    def spy(market: Market, time_limit: float, warm: Warm | None) -> Result:
        given.append(warm)
        return solve(market, time_limit=time_limit, warm=warm)

    standing = Standing()
    first = clearing.run_round(fresh_engine, SETTINGS, "auto", spy, standing)
    assert first is not None
    assert first.matched == 4  # 24 accelerators: 8 + 8 + 4 + 4, or 8 + 8 + 8
    assert given == [None]
    assert standing.warm is not None
    assert standing.warm.pairs  # the jobs the LP placed, by id
    handed = standing.warm
    seed(fresh_engine, lambda s: make_offer(s, provider, price_per_hour="2.50", count=8))
    second = clearing.run_round(fresh_engine, SETTINGS, "auto", spy, standing)
    assert second is not None
    assert given[1] is handed
