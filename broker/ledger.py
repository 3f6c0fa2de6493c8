"""The allocation ledger: matched work, the one module that changes it.

An **allocation** is a job holding accelerators of an offer at the ask locked
when a round matched them. This module is the only code that creates
allocations, moves a matched or running job to another state, or changes an
offer's free count (``Offer.count``); every domain (jobs, offers, nodes,
billing, the provider's side in ``broker.allocations``, clearing) calls it
instead of writing those columns itself. It sits below the domains and imports
only the tables (``broker.models``) and ``broker.db``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from adapters import mig
from broker.db import new_id, utcnow
from broker.errors import Conflict
from broker.models.job import Job
from broker.models.job_state import JobState, check_transition
from broker.models.market import Allocation, AllocationStatus
from broker.models.offer import FractionKind, Offer, OfferStatus
from solver.fractions import parse_shares


def active_allocation(session: Session, job_id: str) -> Allocation | None:
    return session.scalar(
        select(Allocation).where(
            Allocation.job_id == job_id, Allocation.status == AllocationStatus.active
        )
    )


def latest_allocation(session: Session, job_id: str) -> Allocation | None:
    return session.scalar(
        select(Allocation)
        .where(Allocation.job_id == job_id)
        .order_by(Allocation.created_at.desc(), Allocation.id.desc())
        .limit(1)
    )


def latest_allocations(session: Session, job_ids: list[str]) -> dict[str, tuple[Allocation, Offer]]:
    """Each job's latest allocation and the offer it was matched to (jobs never
    matched are left out): where a job runs or ran, and at what locked ask."""
    if not job_ids:
        return {}
    rows = session.execute(
        select(Allocation, Offer)
        .join(Offer, Offer.id == Allocation.offer_id)
        .where(Allocation.job_id.in_(job_ids))
        .order_by(Allocation.created_at, Allocation.id)
    ).all()
    return {allocation.job_id: (allocation, offer) for allocation, offer in rows}


def release(
    session: Session, job: Job, status: AllocationStatus, reason: str | None = None
) -> Allocation | None:
    """End the job's active allocation and return its accelerators to the offer.

    The offer's count is raised in SQL (``count = count + n``), so concurrent
    releases and clearing rounds never lose an update.
    """
    allocation = active_allocation(session, job.id)
    if allocation is None:
        return None
    allocation.status = status
    allocation.ended_at = utcnow()
    allocation.end_reason = reason
    if allocation.slice is not None:
        _release_slice(session, allocation)
    else:
        session.execute(
            update(Offer)
            .where(Offer.id == allocation.offer_id)
            .values(count=Offer.count + allocation.accelerators)
        )
    session.flush()
    return allocation


def _release_slice(session: Session, allocation: Allocation) -> None:
    """Hand a fractional allocation's slice back to its offer (row locked here): a MIG
    instance goes back to the free ones (it still exists); shares go back, and their
    accelerator with them once no other match holds a share of it."""
    offer = session.scalars(
        select(Offer).where(Offer.id == allocation.offer_id).with_for_update()
    ).one()
    assert allocation.slice is not None
    if offer.fraction_kind == FractionKind.mig:
        offer.mig_busy = [i for i in offer.mig_busy if i != allocation.slice]
        offer.mig_instances = sorted({*offer.mig_instances, allocation.slice})
        offer.updated_at = utcnow()
        return
    k, _, gpu = parse_shares(allocation.slice)
    offer.shares_busy = max(0, offer.shares_busy - k)
    if gpu not in shared_gpus_held(session, offer.id):
        offer.count += 1
    offer.updated_at = utcnow()


def held_label(accelerator: str, a: Allocation) -> str:
    """What a run held, as invoices and pages show it: "2 x h100-sxm" (whole ones),
    "h100-sxm 3g.40gb" (a MIG instance), "0.5 x cpu shared" (shares of one)."""
    if a.slice is None:
        return f"{a.accelerators} x {accelerator}"
    if "shared" in a.slice:
        share = Decimal(a.share_num) / Decimal(a.share_den)
        return f"{share.normalize():f} x {accelerator} shared"
    return f"{accelerator} {a.slice.partition('@')[0]}"


def slice_memory_gib(offer: Offer, slice_: str | None) -> float | None:
    """The memory a fractional allocation's slice may use, GiB: its MIG profile's, or
    its shares' (None: whole accelerators)."""
    if slice_ is None:
        return None
    if offer.fraction_kind == FractionKind.mig:
        name = slice_.partition("@")[0]
        profile = next((p for p in mig.profiles(offer.accelerator) if p.name == name), None)
        return None if profile is None else profile.memory_gib
    k, total, _ = parse_shares(slice_)
    per_share = offer.memory_per_share_gib or offer.memory_gib / max(1, total)
    return k * per_share


def shared_gpus_held(session: Session, offer_id: str) -> dict[int, int]:
    """A shared offer's accelerators that active allocations hold shares of, and how
    many shares each."""
    held: Counter[int] = Counter()
    for slice_ in session.scalars(
        select(Allocation.slice).where(
            Allocation.offer_id == offer_id,
            Allocation.status == AllocationStatus.active,
            Allocation.slice.is_not(None),
        )
    ):
        k, _, gpu = parse_shares(slice_ or "")
        held[gpu] += k
    return dict(held)


def end_job(session: Session, job: Job, state: JobState, reason: str | None = None) -> None:
    """Move a job to ``state`` and free its capacity if it no longer needs it
    (cancelled, finished by its provider, or handed back to the book)."""
    job.move_to(state)
    if state in (JobState.succeeded, JobState.failed):
        release(session, job, AllocationStatus.finished, reason)
    elif state in (JobState.cancelled, JobState.open):
        release(session, job, AllocationStatus.released, reason)
    session.flush()


def requeue(session: Session, job: Job, reason: str, max_attempts: int) -> None:
    """Hand a matched or running job back to the order book, because its node was lost,
    stopped, or the run failed in a way another node may not repeat.

    It resumes from its last checkpoint wherever it lands next. A job that has
    been started ``max_attempts`` times fails instead, with the reason.
    """
    if job.state == JobState.running and job.attempts >= max_attempts:
        job.error = f"gave up after {job.attempts} attempts; the last: {reason}"
        end_job(session, job, JobState.failed, reason)
        return
    if job.state == JobState.running:
        job.error = f"attempt {job.attempts} ended: {reason}; back in the order book"
    end_job(session, job, JobState.open, reason)


def release_offer(session: Session, offer: Offer) -> int:
    """Hand matched-but-not-started jobs of a withdrawn offer back to the book."""
    rows = session.execute(
        select(Job, Allocation)
        .join(Allocation, Allocation.job_id == Job.id)
        .where(
            Allocation.offer_id == offer.id,
            Allocation.status == AllocationStatus.active,
            Job.state == JobState.matched,
        )
        .with_for_update()
    ).all()
    for job, _ in rows:
        end_job(session, job, JobState.open, "the offer was withdrawn")
    return len(rows)


def run_footprint(
    energy_kwh: float, gco2: float, runtime_hours: float, accelerators: int, usage_ms: int
) -> tuple[float, float]:
    """A run's energy and emissions for the time it was metered: the match's estimate per
    accelerator-hour (power x PUE, x the grid's intensity) times the accelerator-hours
    billed. Still an estimate (of power), on measured time."""
    hours = runtime_hours * max(1, accelerators)
    if hours <= 0:
        return 0.0, 0.0
    metered = usage_ms / 3_600_000
    return energy_kwh / hours * metered, gco2 / hours * metered


def footprint(a: Allocation) -> tuple[float, float, str]:
    """A run's energy at the wall, its emissions, and their basis: what its agent
    measured (``measured``), else the match's estimate for its metered time
    (``estimated``, ``run_footprint``)."""
    if a.measured_kwh is not None:
        return a.measured_kwh, a.measured_gco2 or 0.0, "measured"
    energy, gco2 = run_footprint(a.energy_kwh, a.gco2, a.runtime_hours, a.accelerators, a.usage_ms)
    return energy, gco2, "estimated"


def withdraw_offer(session: Session, offer: Offer, *, release_matched: bool = True) -> None:
    """Take an active or suspended offer off the market (doing so twice is harmless).

    With ``release_matched`` its matched-but-not-started jobs go back to the book
    at once; a node that went away hands back all of its jobs itself (``requeue``).
    """
    if offer.status not in (OfferStatus.active, OfferStatus.suspended):
        return
    offer.status = OfferStatus.withdrawn
    offer.withdrawn_at = offer.updated_at = utcnow()
    session.flush()
    if release_matched:
        release_offer(session, offer)


def resize_offer(offer: Offer, capacity: int) -> None:
    """Set an offer's capacity; its free count follows, never below what matches hold."""
    held = offer.capacity - offer.count
    if capacity < held:
        raise Conflict(
            f"{held} accelerators of this offer are held by matched or running jobs; "
            f"capacity cannot go below {held}",
            field="body.capacity",
        )
    offer.capacity, offer.count = capacity, capacity - held


def held(offer: Offer) -> int:
    """Accelerators of ``offer`` that active allocations hold."""
    return offer.capacity - offer.count


def start(session: Session, job: Job, allocation: Allocation, offer: Offer) -> None:
    """The provider started a matched job (rows locked by the caller); starting a
    running job again (a retried request) changes nothing."""
    if job.state != JobState.matched:
        return
    job.move_to(JobState.running)
    job.attempts += 1
    job.started_at = allocation.started_at = job.updated_at
    offer.unstarted_strikes = 0  # broker.market.timeouts: strikes count in a row
    session.flush()


@dataclass(frozen=True, slots=True)
class NewAllocation:
    """A match a clearing round checked against the locked rows, priced exactly."""

    job_id: str
    job_state: JobState  # as read under the row lock
    offer_id: str
    accelerators: int
    price_per_hour_micros: int
    runtime_hours: float
    startup_seconds: float
    energy_kwh: float
    gco2: float
    rtt_ms: float
    compute_micros: int
    egress_micros: int
    latency_micros: int
    fee_ppm: int
    # Fractional matches: the slice ("3g.40gb@4", "2/8 shared on GPU 1") and the exact
    # share of one accelerator; ``takes``: how many of the offer's free accelerators the
    # match takes (a share of an accelerator no other match holds takes it; a MIG
    # instance takes none: the GPU stays listed).
    slice: str | None = None
    share_num: int = 1
    share_den: int = 1
    takes: int | None = None  # None: ``accelerators``


def allocate(
    session: Session,
    round_id: str | None,
    matches: Sequence[NewAllocation],
    now: datetime | None = None,
    layouts: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """Record a round's matches in bulk (a large round makes thousands): each job
    goes ``open -> matched`` through the state machine's own check, each offer's
    free count drops by what its matches hold, in SQL (``count = count - n``).

    Fractional matches also mark their slices taken: a MIG offer's instance moves
    to its busy ones (``layouts``: the new instances of idle MIG GPUs the round
    re-partitions), a shared offer's busy shares grow."""
    if not matches:
        return
    for m in matches:
        check_transition(m.job_state, JobState.matched)
    now = now or utcnow()
    session.execute(
        insert(Allocation),
        [
            {
                "id": new_id("alc"),
                "job_id": m.job_id,
                "offer_id": m.offer_id,
                "round_id": round_id,
                "accelerators": m.accelerators,
                "price_per_hour_micros": m.price_per_hour_micros,
                "runtime_hours": m.runtime_hours,
                "startup_seconds": m.startup_seconds,
                "energy_kwh": m.energy_kwh,
                "gco2": m.gco2,
                "rtt_ms": m.rtt_ms,
                "compute_micros": m.compute_micros,
                "egress_micros": m.egress_micros,
                "latency_micros": m.latency_micros,
                "cost_micros": m.compute_micros + m.egress_micros + m.latency_micros,
                "fee_ppm": m.fee_ppm,
                "slice": m.slice,
                "share_num": m.share_num,
                "share_den": m.share_den,
            }
            for m in matches
        ],
    )
    session.execute(
        update(Job),
        [{"id": m.job_id, "state": JobState.matched, "updated_at": now} for m in matches],
    )
    used: Counter[str] = Counter()
    for m in matches:
        used[m.offer_id] += m.accelerators if m.takes is None else m.takes
    _take_slices(session, [m for m in matches if m.slice is not None], layouts or {})
    offers = Offer.metadata.tables["offers"]
    session.execute(
        update(offers)
        .where(offers.c.id == bindparam("offer_id"))
        .values(count=offers.c.count - bindparam("used"), updated_at=bindparam("now")),
        [{"offer_id": i, "used": n, "now": now} for i, n in sorted(used.items())],
    )


def _take_slices(
    session: Session, matches: Sequence[NewAllocation], layouts: dict[str, tuple[str, ...]]
) -> None:
    """Mark the slices of fractional matches taken on their offers (rows locked by
    the caller)."""
    by_offer: dict[str, list[NewAllocation]] = {}
    for m in matches:
        by_offer.setdefault(m.offer_id, []).append(m)
    for offer in session.scalars(select(Offer).where(Offer.id.in_(sorted(by_offer)))):
        taken = [m.slice for m in by_offer[offer.id] if m.slice is not None]
        if offer.fraction_kind == FractionKind.mig:
            instances = layouts.get(offer.id, tuple(offer.mig_instances))
            offer.mig_busy = sorted({*offer.mig_busy, *taken})
            offer.mig_instances = sorted(set(instances) - set(taken))
        else:
            offer.shares_busy += sum(parse_shares(t)[0] for t in taken)
