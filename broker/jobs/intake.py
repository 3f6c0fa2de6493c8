"""Job submissions, stored in batches: group commit for the busiest write.

Each submission is checked on its own (on the event loop when its checks need no
database), then queued; the queue is written by a worker thread, one INSERT and
one COMMIT for every submission that arrived while the last batch was being
written, in the same transaction as the key checks of the requests that arrived
meanwhile (``broker.coalesce.Batched``). A submission is answered once its batch
has committed. If a batch fails, its items are done again each in a savepoint of
its own, so that one bad submission fails alone.

Every submission gets its job's id before its batch runs, key or no key: a batch
whose COMMIT failed may have committed all the same, and its submissions, done
again, find their jobs by those ids instead of storing them twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.accounts.callers import Caller
from broker.accounts.service import KeyOwner, authenticate_keys, due_for_touch, touch_keys
from broker.coalesce import Batched
from broker.db import Transactions, new_id
from broker.errors import BrokerError
from broker.jobs import service
from broker.jobs.schemas import JobCreate
from broker.models.account import Account
from broker.models.job import Job


@dataclass(frozen=True, slots=True)
class Submission:
    account: Account
    data: JobCreate
    idempotency_key: str | None
    job: Job | None  # prepared already, or None: prepared in the batch's transaction
    # The id the job is stored under, fixed before the batch runs (the prepared job's).
    job_id: str = ""

    def __post_init__(self) -> None:
        if not self.job_id:
            object.__setattr__(self, "job_id", self.job.id if self.job else new_id("job"))


# The job stored, or None: the account had used the idempotency key before.
Stored = Job | None


def _store(session: Session, batch: Sequence[Submission]) -> list[Stored | Exception]:
    results: list[Stored | Exception] = [None] * len(batch)
    ready: list[tuple[int, Job]] = []
    for i, submission in enumerate(batch):
        job = submission.job
        if job is None:
            try:
                job = service.prepare_job(
                    session, submission.account, submission.data, submission.idempotency_key
                )
            except BrokerError as e:  # a refused submission (it only read): the others go on
                results[i] = e
                continue
            job.__dict__["id"] = submission.job_id  # made without the ORM's events
        ready.append((i, job))
    inserted = service.insert_jobs(session, [job for _, job in ready])
    for (i, job), stored in zip(ready, inserted, strict=True):
        results[i] = job if stored else None
    return results


def _store_again(session: Session, batch: Sequence[Submission]) -> list[Stored | Exception]:
    """``_store`` for a batch whose COMMIT failed: the jobs that were committed all the
    same are answered as stored, the others are stored now."""
    ids = [s.job_id for s in batch]
    stored = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids)))}
    results: list[Stored | Exception] = [stored.get(s.job_id) for s in batch]
    rest = [i for i, s in enumerate(batch) if s.job_id not in stored]
    for i, result in zip(rest, _store(session, [batch[i] for i in rest]), strict=True):
        results[i] = result
    return results


_submissions: Batched[Submission, Stored] = Batched(_store, write=True, again=_store_again)


@dataclass(frozen=True, slots=True)
class KeyedSubmission:
    """A submission whose API key is not checked yet."""

    key: str
    data: JobCreate
    idempotency_key: str | None
    # Whether the key's owner may submit: the route's own rule (``broker.auth``).
    admit: Callable[[str, KeyOwner | None], Caller]
    job_id: str = field(default_factory=lambda: new_id("job"))


def _store_keyed(
    session: Session, batch: Sequence[KeyedSubmission], *, again: bool = False
) -> list[tuple[Account, Stored] | Exception]:
    """Check the batch's keys (one query), then store the jobs of those that pass."""
    refused: dict[int, Exception] = {}
    accounts: dict[int, Account] = {}
    used: list[str] = []
    for i, owner in enumerate(authenticate_keys(session, [s.key for s in batch])):
        try:
            accounts[i] = batch[i].admit(batch[i].key, owner).account
        except BrokerError as e:  # an unknown key, a node's key, a provider's key
            refused[i] = e
            continue
        if owner is not None and due_for_touch(owner):
            used.append(owner.key_id)
    touch_keys(session, used)
    submissions = [
        Submission(account, batch[i].data, batch[i].idempotency_key, None, batch[i].job_id)
        for i, account in accounts.items()
    ]
    store = _store_again if again else _store
    stored = dict(zip(accounts, store(session, submissions), strict=True))
    results: list[tuple[Account, Stored] | Exception] = []
    for i in range(len(batch)):
        if i in refused:
            results.append(refused[i])
        else:
            job = stored[i]
            results.append(job if isinstance(job, Exception) else (accounts[i], job))
    return results


def _store_keyed_again(
    session: Session, batch: Sequence[KeyedSubmission]
) -> list[tuple[Account, Stored] | Exception]:
    return _store_keyed(session, batch, again=True)


_keyed_submissions: Batched[KeyedSubmission, tuple[Account, Stored]] = Batched(
    _store_keyed, write=True, again=_store_keyed_again
)


async def submit_with_key(
    transactions: Transactions,
    key: str,
    data: JobCreate,
    idempotency_key: str | None,
    admit: Callable[[str, KeyOwner | None], Caller],
) -> tuple[Account, Stored]:
    """``submit`` for a request whose key is checked in the same batch as its job is
    stored (one trip to the database, not two): the developer's account, and the job
    stored or None (``submit``). The key's refusals (``admit``, the route's
    ``broker.auth.Authenticator``) and the job's are raised."""
    return await _keyed_submissions.submit(
        transactions, KeyedSubmission(key, data, idempotency_key, admit)
    )


async def submit(
    transactions: Transactions, account: Account, data: JobCreate, idempotency_key: str | None
) -> Stored:
    """Store the job ``data`` asks for; None if ``idempotency_key`` was used before
    (then ``service.submit_job`` gives that job, or says why not). Refusals
    (``BrokerError``) are raised."""
    job = None
    if not service.needs_database(data):
        job = service.prepare_job(None, account, data, idempotency_key)
    return await _submissions.submit(transactions, Submission(account, data, idempotency_key, job))
