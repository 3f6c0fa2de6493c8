"""Why is a job not matched? Each market rule, and how many offers it rules out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.billing import service as billing
from broker.config import Settings
from broker.jobs.schemas import Unmatched
from broker.market import adapt
from broker.models.job import Job
from broker.models.market import ClearingRound
from broker.models.offer import Offer, OfferStatus
from broker.money import format_usd, micros_to_usd
from solver.market import Market
from solver.rules import RULES, Block, MarketArrays, evaluate

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
    "carbon": "emissions above the job's carbon limit",
    "placement": "not where its service's placement put this replica (see the service)",
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
    market = tuple(adapt.offer(o) for o in offers)
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
        if not offers:
            found[job.id] = _explained({r: 0 for r in RULES}, 0, {}, 0, last)
            continue
        arrays = MarketArrays.build(
            Market(offers=market, jobs=(adapt.job(job, budgets.get(job.id)),), weights=weights)
        )
        block = evaluate(arrays, slice(0, 1))
        counts = {name: int((~mask[0]).sum()) for name, mask in block.rules.items()}
        nearest = _nearest(arrays, block, offers, weights.fee_rate)
        found[job.id] = _explained(counts, len(offers), nearest, int(block.feasible[0].sum()), last)
    return found


def _nearest(
    a: MarketArrays, block: Block, offers: Sequence[Offer], fee_rate: float
) -> dict[str, str]:
    """For each rule that rules offers out, the figure on offer nearest to passing it,
    among the offers that pass every other rule (or all of them, if none does)."""
    out: dict[str, str] = {}
    for rule in RULES:
        failing = ~block.rules[rule][0]
        if not failing.any():
            continue
        others = np.ones(len(offers), dtype=bool)
        for name in RULES:
            if name != rule:
                others &= block.rules[name][0]
        pool = np.flatnonzero(others) if others.any() else np.arange(len(offers))
        text = _figure(rule, a, block, offers, pool, fee_rate)
        if text:
            out[rule] = text
    return out


def _figure(
    rule: str,
    a: MarketArrays,
    block: Block,
    offers: Sequence[Offer],
    pool: np.ndarray,
    fee_rate: float,
) -> str | None:
    job_accelerators = int(a.j_accelerators[0])
    if rule == "capacity":
        i = pool[np.argmax(a.o_count[pool])]
        return (
            f"the largest offer has {int(a.o_count[i])} free accelerators; "
            f"the job needs {job_accelerators} on one offer"
        )
    if rule == "memory":
        i = pool[np.argmax(a.o_memory[pool])]
        return (
            f"the most on offer is {a.o_memory[i]:g} GiB per accelerator; "
            f"the job asks {a.j_memory[0]:g}"
        )
    if rule == "price":
        i = pool[np.argmin(a.o_price_micros[pool])]
        return (
            f"the cheapest ask is {_usd(int(a.o_price_micros[i]))}/h ({offers[i].accelerator}); "
            f"the bid is {_usd(int(a.j_price_micros[0]))}/h"
        )
    if rule == "latency":
        i = pool[np.argmin(block.rtt[0][pool])]
        return (
            f"the nearest offer, in {offers[i].region} ({offers[i].country}), is "
            f"{block.rtt[0][i]:.0f} ms away; the target is {a.j_slo[0]:g} ms"
        )
    if rule == "deadline":
        i = pool[np.argmin(block.runtime[0][pool])]
        return (
            f"the fastest offer ({offers[i].accelerator}) would take "
            f"{block.runtime[0][i]:.3g} h; the deadline is {a.j_deadline[0]:g} h"
            + (
                f", and it is available {a.o_available[i]:g} h"
                if np.isfinite(a.o_available[i])
                else ""
            )
        )
    if rule == "budget":
        cost = block.compute[0][pool] * (1 + fee_rate)
        i = pool[np.argmin(cost)]
        return (
            f"the cheapest run would cost about ${float(np.min(cost)):.2f} with the fee "
            f"({offers[i].accelerator}); ${a.j_budget[0]:.2f} of the budget is left"
        )
    if rule == "residency":
        countries = sorted({offers[i].country for i in pool})
        return f"offers are in {', '.join(countries[:12])}" + (
            " and more" if len(countries) > 12 else ""
        )
    if rule == "platform":
        return f"platforms on offer: {', '.join(sorted({offers[i].platform for i in pool}))}"
    if rule == "vendor":
        models = sorted({offers[i].accelerator for i in pool})
        return f"models on offer: {', '.join(models[:12])}" + (
            " and more" if len(models) > 12 else ""
        )
    return None


def _usd(micros: int) -> str:
    return f"${format_usd(micros_to_usd(micros))}"


def _explained(
    counts: dict[str, int],
    offers: int,
    nearest: dict[str, str],
    feasible: int,
    last: ClearingRound | None,
) -> Unmatched:
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
        reasons = "; ".join(
            f"{RULE_TEXT[rule]}: {n} of {offers}"
            + (f" ({nearest[rule]})" if rule in nearest else "")
            for rule, n in worst
            if n
        )
        summary = f"No offer passes every rule: {reasons}."
    return Unmatched(
        offers_considered=offers,
        feasible=feasible,
        ruled_out=ruled_out,
        nearest=nearest,
        last_round_id=last.id if last else None,
        last_round_at=last.finished_at if last else None,
        summary=summary,
    )
