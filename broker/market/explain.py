"""Why is a job not matched? Each market rule, and how many offers it rules out."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.billing import service as billing
from broker.config import Settings
from broker.jobs.models import Job
from broker.market import adapt
from broker.market.models import ClearingRound
from broker.market.schemas import Unmatched
from broker.offers.models import Offer, OfferStatus
from solver.rules import RULES, explain

RULE_TEXT = {
    "capacity": "too few free accelerators (taken by other matches, or too small)",
    "memory": "too little memory per accelerator",
    "vendor": "vendor or model not in the job's allow-lists",
    "platform": "a platform the job was not built for",
    "residency": "a country outside allowed_countries",
    "price": "ask above the job's max_price_per_hour",
    "budget": "estimated cost, fee included, above what is left of the job's budget_usd",
    "deadline": "would not finish within deadline_hours, or the offer's available_hours",
    "latency": "round trip to the users above latency_slo_ms",
    "carbon": "estimated emissions above the job's max_gco2",
    "value": "would cost more than the job's priority x placement value",
}


def unmatched(session: Session, job: Job, settings: Settings) -> Unmatched:
    return unmatched_many(session, [job], settings)[job.id]


def unmatched_many(
    session: Session, jobs: Sequence[Job], settings: Settings
) -> dict[str, Unmatched]:
    """``unmatched`` for a page of jobs: the offers, the fee and the last round are read
    once for all of them."""
    if not jobs:
        return {}
    offers = session.scalars(select(Offer).where(Offer.status == OfferStatus.active)).all()
    market = [adapt.offer(o) for o in offers]
    fee_ppm, _ = billing.current_fee(session, settings)
    weights = adapt.weights(settings, fee_ppm)
    budgets = billing.budgets_left(session, jobs)
    last = session.scalar(
        select(ClearingRound)
        .where(ClearingRound.finished_at.is_not(None))
        .order_by(ClearingRound.started_at.desc())
        .limit(1)
    )
    found = {}
    for job in jobs:
        counts = explain(adapt.job(job, budgets.get(job.id)), market, weights)
        found[job.id] = _explained(counts, len(offers), last)
    return found


def _explained(counts: dict[str, int], offers: int, last: ClearingRound | None) -> Unmatched:
    feasible = counts.pop("feasible")
    ruled_out = {rule: counts[rule] for rule in RULES}
    if not offers:
        summary = "No offers are listed yet."
    elif feasible:
        summary = (
            f"{feasible} of {offers} offers pass every rule; the next clearing round "
            "will consider them (higher-priority or better-paying jobs may take them first)."
        )
    else:
        worst = sorted(ruled_out.items(), key=lambda kv: -kv[1])
        reasons = "; ".join(f"{RULE_TEXT[rule]}: {n} of {offers}" for rule, n in worst if n)
        summary = f"No offer passes every rule. {reasons}."
    return Unmatched(
        offers_considered=offers,
        feasible=feasible,
        ruled_out=ruled_out,
        last_round_id=last.id if last else None,
        last_round_at=last.finished_at if last else None,
        summary=summary,
    )
