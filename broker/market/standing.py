"""What a process's automatic clearing rounds remember from one round to the next, so
that a round costs what changed in the book rather than the size of the book.

A busy market keeps a standing book: thousands of open jobs that no free offer
can take (their bids are under every ask they fit, or the capacity they need is
used up) wait for the offers to change. Reading, adapting and solving all of
them every few seconds took most of a core on a 7,000-job book. ``Standing``
carries two things over:

- **Rows as the solver sees them.** A round reads only the ids and versions of
  the open jobs and active offers; full rows are read and adapted only for what
  is new or changed since (``updated_at`` is the version: every change a user or
  a round makes to a job's terms or an offer moves it).
- **Jobs no offer can take.** A job that no offer of a round could take, every
  market rule applied (the solver says which: ``Result.unplaceable``), is
  *dormant*: later rounds leave it out until something could change that. The
  job itself changes (its bid, what is left of its budget), the weights change
  (the fee), or an offer appears, is edited or has more free accelerators than it
  had. Only the offers that grew are checked against the dormant jobs
  (``solver.placeable``); the jobs they could take wake up and join the solve.
  Offers that shrank or left can take nothing they could not take before, so the
  other jobs stay dormant, and leaving them out changes no round's answer.

What a round learns holds whether or not its matches are then written: a job is
left out because no offer of the snapshot the round read could take it, and the
next round compares its own snapshot with that one. What another process does to
the book (a replica's round, a user's change) shows in the rows and versions
read, so the memory is safe whoever else writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Protocol, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker import ledger
from broker.billing import service as billing
from broker.market import adapt, estimates
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.offer import FractionKind, Offer, OfferStatus
from solver import Market, Result, Warm, placeable
from solver import market as sm

_CHUNK = 500  # ids per ``IN (...)`` when reading changed rows
BANDS_EVERY_S = 60.0  # how often rounds read the observed ratios of estimates again


class Standing:
    """The memory of one process's automatic rounds (not thread-safe: one loop uses it)."""

    def __init__(self) -> None:
        # Adapted rows by version; jobs without their budget, which moves by itself.
        self._jobs: dict[str, tuple[datetime, sm.Job]] = {}
        self._offers: dict[str, tuple[datetime, sm.Offer]] = {}
        # The offers of the last round, and the jobs none of them could take (as
        # they were then: a job that changed is no longer dormant).
        self._seen: dict[str, sm.Offer] = {}
        self._weights: sm.Weights | None = None
        self._dormant: dict[str, sm.Job] = {}
        # The last solve's LP working set and prices: the next one starts from them.
        self.warm: Warm | None = None
        # When the observed ratios of estimates were read, and what they were.
        self._bands_read: tuple[float, dict[str, estimates.Band]] | None = None

    def read(self, session: Session, weights: sm.Weights) -> tuple[Market, dict[str, datetime]]:
        """The whole book (every open job, every active offer with free accelerators,
        oldest first) and the version of each row, reading only what changed."""
        job_rows = session.execute(
            select(Job.id, Job.updated_at, Job.budget_micros)
            .where(Job.state == JobState.open)
            .order_by(Job.created_at, Job.id)
        ).all()
        offer_rows = session.execute(
            select(Offer.id, Offer.updated_at, Offer.emulated, Offer.count.label("free"))
            .where(
                Offer.status == OfferStatus.active,
                # A shared offer sells its held accelerators' free shares too.
                (Offer.count > 0) | (Offer.shares_busy < Offer.capacity * Offer.shares),
            )
            .order_by(Offer.created_at, Offer.id)
        ).all()
        versions: dict[str, datetime] = {}

        def jobs_by_id(ids: list[str]) -> Iterator[tuple[str, datetime, sm.Job]]:
            for j in session.execute(select(*adapt.JOB_COLUMNS).where(Job.id.in_(ids))):
                yield j.id, j.updated_at, adapt.job(j)

        def offers_by_id(ids: list[str]) -> Iterator[tuple[str, datetime, sm.Offer]]:
            columns = select(*adapt.OFFER_COLUMNS, Offer.count.label("free"), Offer.capacity)
            for o in session.execute(columns.where(Offer.id.in_(ids))):
                offer = adapt.offer(o, o.free)
                if o.fraction_kind == FractionKind.shared:
                    offer = adapt.open_shares(
                        offer, o.capacity, ledger.shared_gpus_held(session, o.id)
                    )
                yield o.id, o.updated_at, offer

        self._jobs = _refresh(jobs_by_id, self._jobs, job_rows, versions)
        self._offers = _refresh(offers_by_id, self._offers, offer_rows, versions)
        budgets = billing.budgets_left(session, job_rows)
        jobs = []
        for r in job_rows:
            if (known := self._jobs.get(r.id)) is None:
                continue  # gone between the two reads
            job = known[1]
            if (left := budgets.get(r.id)) is not None:
                job = replace(job, budget_usd=float(left) / 1e6)
            jobs.append(job)
        observed = self._bands(session)
        offers = []
        for o in offer_rows:
            if (seen := self._offers.get(o.id)) is None:
                continue
            offer = estimates.corrected(seen[1], observed, emulated=o.emulated)
            if offer.fraction_kind != FractionKind.shared and offer.count != o.free:
                offer = replace(offer, count=o.free)
            offers.append(offer)
        return Market(offers=tuple(offers), jobs=tuple(jobs), weights=weights), versions

    def _bands(self, session: Session) -> dict[str, estimates.Band]:
        """The observed ratios of estimates, read again at most every ``BANDS_EVERY_S``."""
        now = time.monotonic()
        if self._bands_read is None or now - self._bands_read[0] >= BANDS_EVERY_S:
            self._bands_read = (now, estimates.bands(session))
        return self._bands_read[1]

    def to_solve(self, book: Market) -> Market:
        """``book`` without its dormant jobs; first wakes those an offer that grew
        since the last round could take."""
        if book.weights != self._weights:
            self._dormant.clear()
        current = {j.id: j for j in book.jobs}
        self._dormant = {i: j for i, j in self._dormant.items() if current.get(i) == j}
        grown = tuple(o for o in book.offers if _grew(self._seen.get(o.id), o))
        if grown and self._dormant:
            dormant = Market(offers=grown, jobs=tuple(self._dormant.values()), weights=book.weights)
            for job_id in placeable(dormant):
                del self._dormant[job_id]
        self._seen = {o.id: o for o in book.offers}
        self._weights = book.weights
        if not book.offers:  # no free capacity at all: no job can be placed
            self._dormant.update(current)
        if not self._dormant:
            return book
        return replace(book, jobs=tuple(j for j in book.jobs if j.id not in self._dormant))

    def solved(self, market: Market, result: Result) -> None:
        """Remember the jobs of ``market`` that no offer of it could take."""
        jobs = {j.id: j for j in market.jobs}
        for job_id in result.unplaceable:
            self._dormant[job_id] = jobs[job_id]
        self.warm = result.warm

    @property
    def dormant(self) -> frozenset[str]:
        """The open jobs that rounds leave out until an offer could take them."""
        return frozenset(self._dormant)


def _grew(before: sm.Offer | None, now: sm.Offer) -> bool:
    """Whether ``now`` might take a job that ``before`` could not."""
    return before is None or now.count > before.count or replace(before, count=now.count) != now


_Row = TypeVar("_Row", sm.Job, sm.Offer)


class _Versioned(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def updated_at(self) -> datetime: ...


def _refresh(
    by_id: Callable[[list[str]], Iterable[tuple[str, datetime, _Row]]],
    known: dict[str, tuple[datetime, _Row]],
    rows: Sequence[_Versioned],
    versions: dict[str, datetime],
) -> dict[str, tuple[datetime, _Row]]:
    """``known`` for exactly ``rows``: entries whose version still holds are kept,
    the others read in full and adapted (``by_id``). Fills ``versions``."""
    fresh: dict[str, tuple[datetime, _Row]] = {}
    changed = []
    for r in rows:
        entry = known.get(r.id)
        if entry is not None and entry[0] == r.updated_at:
            fresh[r.id] = entry
            versions[r.id] = r.updated_at
        else:
            changed.append(r.id)
    for start in range(0, len(changed), _CHUNK):
        for row_id, version, value in by_id(changed[start : start + _CHUNK]):
            # The full row's own version: if it changed since the first read, a
            # match made from it is checked against this one.
            fresh[row_id] = (version, value)
            versions[row_id] = version
    return fresh
