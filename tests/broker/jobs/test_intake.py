"""Submissions written in batches (group commit): each one answered as if alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from broker.auth import BATCHED_DEVELOPER, _key_checks
from broker.coalesce import Batched, _flush_shared
from broker.db import EngineTransactions, transaction
from broker.errors import Forbidden, InvalidInput, Unauthorized
from broker.jobs import intake, service
from broker.jobs.schemas import JobCreate
from broker.models.account import Role
from broker.models.job import Job
from tests.factories import job_body, make_account


def _write(engine: Engine, batch: list[Any]) -> list[Any]:
    """Flush ``batch`` as the shared queue would: submissions, or ``("key", key)``."""
    items = [
        (_key_checks, item[1]) if isinstance(item, tuple) else (intake._submissions, item)
        for item in batch
    ]
    return _flush_shared(EngineTransactions(engine), items)


def _submission(account: Any, key: str | None = None, **body: Any) -> intake.Submission:
    data = JobCreate.model_validate(job_body(**body))
    job = None if service.needs_database(data) else service.prepare_job(None, account, data, key)
    return intake.Submission(account, data, key, job)


def test_a_batch_stores_each_job_once_and_refuses_only_the_bad_one(fresh_engine: Engine) -> None:
    with transaction(fresh_engine) as session:
        developer, _ = make_account(session, Role.developer)
    batch = [
        _submission(developer, "k1"),
        _submission(developer, "k1"),  # a retry that came in the same batch
        _submission(developer, None, max_price_per_hour="9.00"),
        # Checked in the batch's transaction: its artifact was never uploaded.
        _submission(developer, "k2", artifact="ab" * 32, inputs="cd" * 32, platforms=None),
    ]
    results = _write(fresh_engine, batch)
    assert isinstance(results[0], Job)
    assert results[1] is None  # the key was used: the retry is answered by a replay
    assert isinstance(results[2], Job)
    assert isinstance(results[3], InvalidInput)
    assert results[3].field == "body.artifact"
    with transaction(fresh_engine, write=False) as session:
        stored = session.scalars(select(Job.id).order_by(Job.id)).all()
    assert sorted(stored) == sorted([results[0].id, results[2].id])


def test_when_a_batch_fails_its_submissions_are_written_one_by_one(fresh_engine: Engine) -> None:
    with transaction(fresh_engine) as session:
        developer, key = make_account(session, Role.developer)
    good = _submission(developer, "a")
    orphan = _submission(developer, "b")
    assert orphan.job is not None
    orphan.job.account_id = "acc_gone"  # a foreign key the database refuses
    results = _write(fresh_engine, [good, ("key", key), orphan, ("key", "bk_unknown")])
    assert isinstance(results[0], Job)
    assert results[1][0].id == developer.id  # a key checked in the same batch
    assert "foreign key" in str(results[2]).lower()
    assert results[3] is None
    with transaction(fresh_engine, write=False) as session:
        assert session.scalars(select(Job.id)).all() == [results[0].id]


def test_a_keyed_batch_checks_each_key_then_stores_the_jobs(fresh_engine: Engine) -> None:
    """``submit_with_key``'s batches: one query for the keys, then the jobs of the keys
    that pass; each refusal is the one the key alone would get."""
    with transaction(fresh_engine) as session:
        developer, key = make_account(session, Role.developer)
        _, provider_key = make_account(session, Role.provider)

    def keyed(api_key: str, idempotency_key: str | None = None, **body: Any) -> Any:
        data = JobCreate.model_validate(job_body(**body))
        return (
            intake._keyed_submissions,
            intake.KeyedSubmission(api_key, data, idempotency_key, BATCHED_DEVELOPER.admit_key),
        )

    batch = [
        keyed(key, "k1"),
        keyed("bk_unknown", "k1"),
        keyed(provider_key),
        keyed(key, "k1"),  # a retry in the same batch
        keyed(key, None, artifact="ab" * 32, inputs="cd" * 32, platforms=None),
        keyed(key),
    ]
    results = _flush_shared(EngineTransactions(fresh_engine), batch)
    account, job = results[0]
    assert account.id == developer.id
    assert isinstance(job, Job)
    assert isinstance(results[1], Unauthorized)
    assert isinstance(results[2], Forbidden)
    assert "developer" in str(results[2])
    assert results[3][1] is None  # the key was used: answered by a replay
    assert isinstance(results[4], InvalidInput)
    assert results[4].field == "body.artifact"
    assert isinstance(results[5][1], Job)
    with transaction(fresh_engine, write=False) as session:
        stored = session.scalars(select(Job.id)).all()
    assert sorted(stored) == sorted([job.id, results[5][1].id])


def test_concurrent_submissions_on_a_live_server(live_url: str, fresh_engine: Engine) -> None:
    """60 requests at once, 20 of them retries of others: 40 jobs, each retry answered
    with the job its key made, and every answer's job stored."""
    with transaction(fresh_engine) as session:
        _, key = make_account(session, Role.developer)

    async def send_all() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=live_url, headers=headers, timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/v1/jobs",
                        json=job_body(accelerators=1 + i % 40 % 4),
                        headers={"Idempotency-Key": f"key-{i % 40}"},
                    )
                    for i in range(60)
                )
            )

    answers = asyncio.run(send_all())
    assert sorted({a.status_code for a in answers}) == [200, 201]
    by_key: dict[int, set[str]] = {}
    for i, answer in enumerate(answers):
        by_key.setdefault(i % 40, set()).add(answer.json()["id"])
    assert all(len(ids) == 1 for ids in by_key.values())
    assert sum(a.status_code == 201 for a in answers) == 40
    with Session(fresh_engine) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 40
        stored = set(session.scalars(select(Job.id)))
    assert stored == {id_ for ids in by_key.values() for id_ in ids}


class _CommitThenFail:
    """Transactions whose first write COMMIT goes through and is then reported failed,
    as when the connection drops after the server committed (an ambiguous failure)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.failed = False

    @contextmanager
    def __call__(self, *, write: bool = True) -> Iterator[Session]:
        with transaction(self.engine, write=write) as session:
            yield session
        if write and not self.failed:
            self.failed = True
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))


def test_a_batch_whose_commit_failed_but_went_through_stores_no_job_twice(
    fresh_engine: Engine,
) -> None:
    """Jobs without an Idempotency-Key too: done again after an ambiguous COMMIT, each
    submission finds the job it stored, and every one is answered with its job."""
    with transaction(fresh_engine) as session:
        developer, key = make_account(session, Role.developer)

    def keyed(idempotency_key: str | None = None) -> Any:
        data = JobCreate.model_validate(job_body())
        return (
            intake._keyed_submissions,
            intake.KeyedSubmission(key, data, idempotency_key, BATCHED_DEVELOPER.admit_key),
        )

    batch = [
        keyed(),
        keyed(),
        keyed("k1"),
        (intake._submissions, _submission(developer)),
        (intake._submissions, _submission(developer, "k2", max_price_per_hour="4.00")),
    ]
    transactions = _CommitThenFail(fresh_engine)
    results = _flush_shared(transactions, batch)
    assert transactions.failed
    jobs = [r[1] if isinstance(r, tuple) else r for r in results]
    assert all(isinstance(job, Job) for job in jobs), results
    with transaction(fresh_engine, write=False) as session:
        stored = session.scalars(select(Job.id)).all()
    assert sorted(stored) == sorted(job.id for job in jobs)  # five jobs, not more


def test_a_failing_item_costs_the_rest_of_its_batch_one_wait_not_one_each(
    fresh_engine: Engine,
) -> None:
    """A batch that fails is done again in one transaction (a savepoint per item), so
    when opening a transaction waits (another writer holds the lock), the batch's other
    items wait twice in all, not once more each."""
    wait = 0.2

    class Slow:
        def __init__(self) -> None:
            self.opened = 0

        @contextmanager
        def __call__(self, *, write: bool = True) -> Iterator[Session]:
            self.opened += 1
            time.sleep(wait)
            with transaction(fresh_engine, write=write) as session:
                yield session

    def handle(session: Session, payloads: Sequence[str]) -> list[str]:
        if "bad" in payloads:
            raise RuntimeError("this one breaks whatever batch it is in")
        return [p.upper() for p in payloads]

    kind: Batched[str, str] = Batched(handle, write=True)
    transactions = Slow()
    started = time.monotonic()
    results = _flush_shared(transactions, [(kind, p) for p in ("a", "b", "bad", "c", "d", "e")])
    elapsed = time.monotonic() - started
    assert results[:2] == ["A", "B"]
    assert results[3:] == ["C", "D", "E"]
    assert isinstance(results[2], RuntimeError)
    assert transactions.opened == 2
    assert elapsed < 3 * wait
