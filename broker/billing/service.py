"""The fee, job budgets and what each job costs: the billing rules the market and
the metering apply. Functions take the session and never commit."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.billing.amounts import (
    percent_to_ppm,
    to_micros,
    usage_charge,
    usage_within,
    with_fee,
)
from broker.config import Settings
from broker.db import new_id, utcnow
from broker.ledger import end_job
from broker.models.account import Account
from broker.models.billing import FeeSetting
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.market import Allocation
from broker.money import micros_to_usd


def current_fee(session: Session, settings: Settings) -> tuple[int, FeeSetting | None]:
    """The fee in force, in ppm, and the admin's setting it comes from (None: the
    ``BROKER_FEE_PERCENT`` default)."""
    row = session.scalar(
        select(FeeSetting).order_by(FeeSetting.created_at.desc(), FeeSetting.id.desc()).limit(1)
    )
    if row is None:
        return percent_to_ppm(settings.fee_percent), None
    return row.fee_ppm, row


def set_fee(session: Session, admin: Account, percent: Decimal) -> FeeSetting:
    """Set the fee for matches from now on; running matches keep the fee they locked."""
    row = FeeSetting(id=new_id("fee"), fee_ppm=percent_to_ppm(percent), set_by=admin.id)
    row.created_at = utcnow()
    session.add(row)
    session.flush()
    return row


def allocation_charge(a: Allocation) -> Fraction:
    """What an allocation's metered usage costs the developer, fee included, exactly."""
    return with_fee(usage_charge(a.usage_ms, a.price_per_hour_micros), a.fee_ppm)


def _allocations(session: Session, job_ids: Iterable[str]) -> list[Allocation]:
    ids = sorted(set(job_ids))
    if not ids:
        return []
    return list(
        session.scalars(
            select(Allocation)
            .where(Allocation.job_id.in_(ids))
            .order_by(Allocation.created_at, Allocation.id)
        )
    )


def spent(session: Session, job_ids: Iterable[str]) -> dict[str, Fraction]:
    """Each job's metered cost so far over all its runs, fee included, exactly."""
    totals: dict[str, Fraction] = {}
    for a in _allocations(session, job_ids):
        totals[a.job_id] = totals.get(a.job_id, Fraction(0)) + allocation_charge(a)
    return totals


def budget_left(budget_micros: int | None, spent_micros: Fraction) -> Fraction | None:
    """What is left of a job's budget (None: it has none)."""
    if budget_micros is None:
        return None
    return max(Fraction(0), Fraction(budget_micros) - spent_micros)


class Budgeted(Protocol):
    """A job row, or the columns of one that a budget needs."""

    @property
    def id(self) -> str: ...
    @property
    def budget_micros(self) -> int | None: ...


def budgets_left(session: Session, jobs: Iterable[Budgeted]) -> dict[str, Fraction]:
    """What is left of each budgeted job's budget after its earlier runs."""
    budgeted = {j.id: j.budget_micros for j in jobs if j.budget_micros is not None}
    spent_by_job = spent(session, budgeted)
    left = {i: budget_left(b, spent_by_job.get(i, Fraction(0))) for i, b in budgeted.items()}
    return {job_id: amount for job_id, amount in left.items() if amount is not None}


def usage_cap_ms(session: Session, allocation: Allocation, job: Job) -> int | None:
    """The most accelerator-milliseconds this allocation may bill before the job's
    budget is used up, counting what its earlier runs cost (None: no budget)."""
    if job.budget_micros is None:
        return None
    earlier = sum(
        (allocation_charge(a) for a in _allocations(session, [job.id]) if a.id != allocation.id),
        Fraction(0),
    )
    left = budget_left(job.budget_micros, earlier)
    assert left is not None
    return usage_within(left, allocation.price_per_hour_micros, allocation.fee_ppm)


def stop_at_budget(session: Session, job: Job) -> None:
    """End a running job whose metered cost reached its budget (rows locked by the caller)."""
    assert job.budget_micros is not None
    budget = micros_to_usd(job.budget_micros)
    job.error = f"stopped: its metered cost, fee included, reached its budget of ${budget}"
    end_job(session, job, JobState.failed, job.error)


@dataclass(frozen=True, slots=True)
class JobCost:
    """A job's money, for the developer: the ask locked by its latest match, that
    match's estimated cost and the metered cost over all its runs (fee included,
    rounded to the micro-dollar for display; invoices round once, per line)."""

    price_per_hour_micros: int | None
    fee_ppm: int | None
    estimated_micros: int | None
    metered_micros: int


def job_costs(session: Session, job_ids: Iterable[str]) -> dict[str, JobCost]:
    """One query for a page of jobs."""
    latest: dict[str, Allocation] = {}
    metered: dict[str, Fraction] = {}
    for a in _allocations(session, job_ids):
        latest[a.job_id] = a  # ordered oldest first: the last one wins
        metered[a.job_id] = metered.get(a.job_id, Fraction(0)) + allocation_charge(a)
    costs = {}
    for job_id in job_ids:
        match = latest.get(job_id)
        costs[job_id] = JobCost(
            price_per_hour_micros=match.price_per_hour_micros if match else None,
            fee_ppm=match.fee_ppm if match else None,
            estimated_micros=to_micros(with_fee(Fraction(match.compute_micros), match.fee_ppm))
            if match
            else None,
            metered_micros=to_micros(metered.get(job_id, Fraction(0))),
        )
    return costs
