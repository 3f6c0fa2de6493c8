"""Clearing rounds against a real database: matches, money, capacity, concurrency."""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from broker.config import Settings
from broker.db import transaction
from broker.ledger import end_job
from broker.market import clearing
from broker.models.account import Account, Role
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.market import Allocation, AllocationStatus, ClearingRound
from broker.models.offer import Offer
from broker.offers.service import withdraw_offer
from tests.conftest import ClientFactory
from tests.factories import make_account, make_job, make_offer

SETTINGS = Settings(clear_time_limit_seconds=5)


def seed(engine: Engine, fn: Any) -> Any:
    with transaction(engine) as session:
        return fn(session)


def accounts(engine: Engine) -> tuple[Account, Account]:
    pair: tuple[Account, Account] = seed(
        engine,
        lambda s: (make_account(s, Role.provider)[0], make_account(s, Role.developer)[0]),
    )
    return pair


def check_invariants(engine: Engine, listed: dict[str, int]) -> None:
    """No offer oversold, capacity accounted for, no job held twice."""
    with transaction(engine, write=False) as s:
        for offer_id, total in listed.items():
            offer = s.get_one(Offer, offer_id)
            held = s.scalar(
                select(func.coalesce(func.sum(Allocation.accelerators), 0)).where(
                    Allocation.offer_id == offer_id, Allocation.status == AllocationStatus.active
                )
            )
            assert offer.count >= 0
            assert offer.count + (held or 0) == total, offer_id
        doubles = s.execute(
            select(Allocation.job_id)
            .where(Allocation.status == AllocationStatus.active)
            .group_by(Allocation.job_id)
            .having(func.count() > 1)
        ).all()
        assert doubles == []
        for job in s.scalars(select(Job)):
            active = s.scalar(
                select(func.count()).where(
                    Allocation.job_id == job.id, Allocation.status == AllocationStatus.active
                )
            )
            assert active == (1 if job.state in (JobState.matched, JobState.running) else 0)


def test_a_round_matches_locks_the_ask_and_prices_exactly(fresh_engine: Engine) -> None:
    provider, developer = accounts(fresh_engine)
    offer = seed(fresh_engine, lambda s: make_offer(s, provider, price_per_hour="2.49", count=8))
    job = seed(
        fresh_engine,
        lambda s: make_job(
            s,
            developer,
            accelerators=2,
            duration_hours=3,
            max_price_per_hour="3.10",
            data_region="us-east-1",
            data_gb=120,
        ),
    )
    record = clearing.run_round(fresh_engine, SETTINGS)
    assert record is not None
    assert (record.status, record.matched, record.stale) == ("OPTIMAL", 1, 0)
    assert (record.jobs_considered, record.offers_considered) == (1, 1)
    assert record.gap == 0
    assert record.finished_at is not None

    with transaction(fresh_engine, write=False) as s:
        allocation = s.scalars(select(Allocation)).one()
        assert (allocation.job_id, allocation.offer_id, allocation.accelerators) == (
            job.id,
            offer.id,
            2,
        )
        assert allocation.price_per_hour_micros == 2_490_000
        assert allocation.compute_micros == 14_940_000  # 2.49 x 2 x 3 h
        assert allocation.egress_micros == 10_800_000  # 120 GB x $0.09, data elsewhere
        assert allocation.latency_micros == 0
        assert allocation.cost_micros == 25_740_000
        assert s.get_one(Job, job.id).state == JobState.matched
        assert s.get_one(Offer, offer.id).count == 6
    check_invariants(fresh_engine, {offer.id: 8})


def test_capacity_returns_after_cancel_and_completion(fresh_engine: Engine) -> None:
    provider, developer = accounts(fresh_engine)
    offer = seed(fresh_engine, lambda s: make_offer(s, provider, count=2))
    jobs = [seed(fresh_engine, lambda s: make_job(s, developer)) for _ in range(4)]
    listed = {offer.id: 2}

    first = clearing.run_round(fresh_engine, SETTINGS)
    assert first is not None
    assert first.matched == 2
    check_invariants(fresh_engine, listed)

    with transaction(fresh_engine) as s:
        matched = s.scalars(select(Job).where(Job.state == JobState.matched)).all()
        end_job(s, matched[0], JobState.cancelled)
        matched[1].move_to(JobState.running)
        end_job(s, matched[1], JobState.succeeded)
    check_invariants(fresh_engine, listed)
    with transaction(fresh_engine, write=False) as s:
        assert s.get_one(Offer, offer.id).count == 2
        statuses = sorted(a.status.value for a in s.scalars(select(Allocation)))
        assert statuses == ["finished", "released"]

    second = clearing.run_round(fresh_engine, SETTINGS)
    assert second is not None
    assert second.matched == 2
    check_invariants(fresh_engine, listed)
    with transaction(fresh_engine, write=False) as s:
        states = sorted(s.get_one(Job, j.id).state.value for j in jobs)
        assert states == ["cancelled", "matched", "matched", "succeeded"]
        assert s.get_one(Offer, offer.id).count == 0

    third = clearing.run_round(fresh_engine, SETTINGS)
    assert third is not None
    assert third.matched == 0


def test_withdrawing_an_offer_hands_its_matches_back(fresh_engine: Engine) -> None:
    provider, developer = accounts(fresh_engine)
    offer = seed(fresh_engine, lambda s: make_offer(s, provider, count=4))
    job = seed(fresh_engine, lambda s: make_job(s, developer))
    clearing.run_round(fresh_engine, SETTINGS)
    with transaction(fresh_engine) as s:
        withdraw_offer(s, s.get_one(Account, provider.id), offer.id)
    with transaction(fresh_engine, write=False) as s:
        assert s.get_one(Job, job.id).state == JobState.open
        assert s.scalars(select(Allocation)).one().status == AllocationStatus.released


def test_matches_made_stale_during_the_solve_are_skipped(
    fresh_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider, developer = accounts(fresh_engine)
    offer = seed(fresh_engine, lambda s: make_offer(s, provider, price_per_hour="2.00", count=4))
    seed(fresh_engine, lambda s: make_job(s, developer, max_price_per_hour="3.00"))
    real_solve = clearing.solve  # type: ignore[attr-defined]

    def solve_while_repricing(*args: Any, **kwargs: Any) -> Any:
        result = real_solve(*args, **kwargs)
        with transaction(fresh_engine) as s:
            s.get_one(Offer, offer.id).price_per_hour_micros = 2_900_000
        return result

    monkeypatch.setattr(clearing, "solve", solve_while_repricing)
    record = clearing.run_round(fresh_engine, SETTINGS)
    assert record is not None
    assert (record.matched, record.stale) == (0, 1)
    monkeypatch.setattr(clearing, "solve", real_solve)
    again = clearing.run_round(fresh_engine, SETTINGS)
    assert again is not None
    assert again.matched == 1
    with transaction(fresh_engine, write=False) as s:
        assert s.scalars(select(Allocation)).one().price_per_hour_micros == 2_900_000


def test_an_offer_edited_during_the_solve_is_not_matched_on_old_terms(
    fresh_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker.offers.schemas import OfferUpdate
    from broker.offers.service import update_offer

    provider, developer = accounts(fresh_engine)
    offer = seed(fresh_engine, lambda s: make_offer(s, provider, count=4))
    seed(fresh_engine, lambda s: make_job(s, developer, duration_hours=10))
    real_solve = clearing.solve  # type: ignore[attr-defined]

    def solve_while_editing(*args: Any, **kwargs: Any) -> Any:
        result = real_solve(*args, **kwargs)
        with transaction(fresh_engine) as s:
            owner = s.get_one(Account, provider.id)
            update_offer(s, owner, offer.id, OfferUpdate(available_hours=1))
        return result

    monkeypatch.setattr(clearing, "solve", solve_while_editing)
    record = clearing.run_round(fresh_engine, SETTINGS)
    assert record is not None
    assert (record.matched, record.stale) == (0, 1)


def test_capacity_changes_keep_what_matches_hold(
    fresh_engine: Engine, fresh_client_for: ClientFactory
) -> None:
    provider, developer = accounts(fresh_engine)
    key = seed(fresh_engine, lambda s: make_account(s, Role.provider)[1])
    offer = seed(fresh_engine, lambda s: make_offer(s, provider, count=8))
    seed(fresh_engine, lambda s: make_job(s, developer, accelerators=4))
    clearing.run_round(fresh_engine, SETTINGS)
    with transaction(fresh_engine) as s:
        owner = s.get_one(Account, provider.id)
        from broker.offers.schemas import OfferUpdate
        from broker.offers.service import update_offer

        changed = update_offer(s, owner, offer.id, OfferUpdate(capacity=6))
        assert (changed.capacity, changed.count) == (6, 2)
    check_invariants(fresh_engine, {offer.id: 6})
    with transaction(fresh_engine) as s:
        owner = s.get_one(Account, provider.id)
        from broker.errors import Conflict
        from broker.offers.schemas import OfferUpdate
        from broker.offers.service import update_offer

        with pytest.raises(Conflict, match="held by matched or running jobs"):
            update_offer(s, owner, offer.id, OfferUpdate(capacity=3))
    # Another provider cannot touch it at all.
    other = fresh_client_for(key)
    assert other.patch(f"/v1/offers/{offer.id}", json={"capacity": 1}).status_code == 404


def test_concurrent_rounds_never_oversell(fresh_engine: Engine) -> None:
    """Rounds solving the same snapshot at once, leader lock bypassed on purpose."""
    provider, developer = accounts(fresh_engine)
    offers = [seed(fresh_engine, lambda s: make_offer(s, provider, count=3)) for _ in range(3)]
    for i in range(20):
        seed(fresh_engine, lambda s, i=i: make_job(s, developer, accelerators=1 + i % 2))
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def race() -> None:
        try:
            barrier.wait()
            clearing._run(fresh_engine, SETTINGS, "manual")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=race) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    check_invariants(fresh_engine, {o.id: 3 for o in offers})
    with transaction(fresh_engine, write=False) as s:
        rounds = s.scalars(select(ClearingRound)).all()
        assert len(rounds) == 4
        assert sum(r.matched for r in rounds) == s.scalar(select(func.count(Allocation.id)))
        assert sum(r.matched for r in rounds) > 0


def test_only_one_round_at_a_time(fresh_engine: Engine) -> None:
    with clearing.leader(fresh_engine) as got:
        assert got
        with pytest.raises(clearing.RoundInProgress):
            clearing.run_round(fresh_engine, SETTINGS)
    assert clearing.run_round(fresh_engine, SETTINGS) is not None


def test_automatic_rounds_with_nothing_to_do_leave_no_record(fresh_engine: Engine) -> None:
    assert clearing.run_round(fresh_engine, SETTINGS, trigger="auto") is None
    with transaction(fresh_engine, write=False) as s:
        assert s.scalar(select(func.count(ClearingRound.id))) == 0


def test_clearing_over_http(fresh_engine: Engine, fresh_client_for: ClientFactory) -> None:
    keys = seed(
        fresh_engine,
        lambda s: {
            role: make_account(s, role)[1] for role in (Role.admin, Role.provider, Role.developer)
        },
    )
    admin, provider, developer = (
        fresh_client_for(keys[r]) for r in (Role.admin, Role.provider, Role.developer)
    )
    provider.post(
        "/v1/offers",
        json={
            "accelerator": "h100-sxm",
            "count": 8,
            "price_per_hour": "2.49",
            "region": "europe-west4",
            "country": "NL",
            "lat": 53.44,
            "lon": 6.84,
        },
    )
    cheap = developer.post(
        "/v1/jobs",
        json={
            "platforms": ["cuda"],
            "max_price_per_hour": "1.00",
            "duration_hours": 1,
        },
    ).json()
    fits = developer.post(
        "/v1/jobs",
        json={
            "platforms": ["cuda"],
            "accelerators": 2,
            "max_price_per_hour": "3.00",
            "duration_hours": 2,
        },
    ).json()

    assert developer.post("/v1/market/clear").status_code == 403
    round_ = admin.post("/v1/market/clear")
    assert round_.status_code == 200, round_.text
    assert round_.json()["matched"] == 1
    listing = developer.get("/v1/market/rounds").json()
    assert [r["id"] for r in listing["items"]] == [round_.json()["id"]]
    assert developer.get(f"/v1/market/rounds/{round_.json()['id']}").json()["status"] == "OPTIMAL"
    assert developer.get("/v1/market/rounds/rnd_nope").status_code == 404

    matched = developer.get(f"/v1/jobs/{fits['id']}").json()
    assert matched["state"] == "matched"
    assert matched["unmatched"] is None
    assert matched["allocation"]["price_per_hour"] == "2.49"
    assert matched["allocation"]["estimated_cost"] == {
        "compute": "9.96",
        "egress": "0.00",
        "latency": "0.00",
        "total": "9.96",
    }

    waiting = developer.get(f"/v1/jobs/{cheap['id']}").json()
    assert waiting["state"] == "open"
    assert waiting["allocation"] is None
    why = waiting["unmatched"]
    assert why["offers_considered"] == 1
    assert why["feasible"] == 0
    assert why["ruled_out"]["price"] == 1
    assert why["ruled_out"]["platform"] == 0
    assert "ask above the job's max_price_per_hour: 1 of 1" in why["summary"]
    assert why["last_round_id"] == round_.json()["id"]

    book = developer.get("/v1/market/book").json()["books"][0]
    assert book["asks"][0]["quantity"] == 6  # two accelerators are taken


def test_money_is_exact_over_many_matches(fresh_engine: Engine) -> None:
    provider, developer = accounts(fresh_engine)
    prices = ["0.1", "0.2", "0.3", "1.000001", "2.49"]
    for p in prices:
        seed(fresh_engine, lambda s, p=p: make_offer(s, provider, price_per_hour=p, count=3))
    for i in range(12):
        seed(
            fresh_engine,
            lambda s, i=i: make_job(
                s, developer, duration_hours=[0.1, 0.7, 3][i % 3], max_price_per_hour="5"
            ),
        )
    clearing.run_round(fresh_engine, SETTINGS)
    with transaction(fresh_engine, write=False) as s:
        for a in s.scalars(select(Allocation)):
            job = s.get_one(Job, a.job_id)
            expected = (
                Decimal(a.price_per_hour_micros) * a.accelerators * Decimal(str(job.duration_hours))
            )
            assert a.compute_micros == int(expected.to_integral_value())
            assert a.cost_micros == a.compute_micros + a.egress_micros + a.latency_micros


def test_a_job_rebid_during_the_solve_is_not_matched_on_its_old_bid(
    fresh_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker.jobs.service import change_bid

    provider, developer = accounts(fresh_engine)
    seed(fresh_engine, lambda s: make_offer(s, provider, price_per_hour="2.00", count=4))
    job = seed(fresh_engine, lambda s: make_job(s, developer, max_price_per_hour="3.00"))
    real_solve = clearing.solve  # type: ignore[attr-defined]

    def solve_while_rebidding(*args: Any, **kwargs: Any) -> Any:
        result = real_solve(*args, **kwargs)
        with transaction(fresh_engine) as s:
            change_bid(s, s.get_one(Account, developer.id), job.id, Decimal("1.50"))
        return result

    monkeypatch.setattr(clearing, "solve", solve_while_rebidding)
    record = clearing.run_round(fresh_engine, SETTINGS)
    assert record is not None
    assert (record.matched, record.stale) == (0, 1)
    monkeypatch.setattr(clearing, "solve", real_solve)
    again = clearing.run_round(fresh_engine, SETTINGS)
    assert again is not None
    assert again.matched == 0  # the ask (2.00) is above the new bid (1.50)
    with transaction(fresh_engine, write=False) as s:
        assert s.get_one(Job, job.id).state == JobState.open
