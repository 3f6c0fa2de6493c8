"""Providers' statements of earnings: usage sold at their asks, by node and offer.

A provider earns its locked ask for every metered accelerator-hour of the runs
that ended in the statement's window; the broker's fee is charged to the
developer on top, so it does not come out of the provider's earnings. A row is
one offer at one locked price (an offer repriced mid-period has a row per
price); each row's amount is rounded to the cent once, like an invoice line.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.accounts.visibility import owns
from broker.billing.amounts import to_cents, usage_charge
from broker.errors import Forbidden
from broker.ledger import footprint
from broker.models.account import Account, Role
from broker.models.market import Allocation, AllocationStatus
from broker.models.node import Node
from broker.models.offer import Offer


@dataclass
class StatementRow:
    node_id: str | None
    node_name: str | None
    offer_id: str
    accelerator: str
    region: str
    price_per_hour_micros: int
    runs: int
    usage_ms: int
    exact_micros: Fraction
    energy_kwh: float = 0.0  # measured where the agents measured it, else estimated
    gco2: float = 0.0
    measured_runs: int = 0  # of ``runs``, those whose energy their agent measured

    @property
    def amount_cents(self) -> int:
        return to_cents(self.exact_micros)


@dataclass
class Statement:
    provider_id: str
    start: datetime
    end: datetime
    rows: list[StatementRow]

    @property
    def total_cents(self) -> int:
        return sum(row.amount_cents for row in self.rows)


def statement(
    session: Session, viewer: Account, provider_id: str | None, start: datetime, end: datetime
) -> Statement:
    """The earnings of ``provider_id`` (default: the viewer) from runs that ended in
    [start, end). Providers see their own; admins anyone's."""
    if viewer.role == Role.developer:
        raise Forbidden("statements are for providers; a developer's charges are in invoices")
    owner = provider_id or viewer.id
    if not owns(viewer, owner):
        raise Forbidden("a provider sees its own statement only")
    runs = session.execute(
        select(Allocation, Offer, Node.name)
        .join(Offer, Offer.id == Allocation.offer_id)
        .outerjoin(Node, Node.id == Offer.node_id)
        .where(
            Offer.provider_id == owner,
            Allocation.status != AllocationStatus.active,
            Allocation.usage_ms > 0,
            Allocation.ended_at >= start,
            Allocation.ended_at < end,
        )
        .order_by(Offer.node_id, Offer.id, Allocation.price_per_hour_micros)
    ).all()
    rows: dict[tuple[str, int], StatementRow] = {}
    for a, offer, node_name in runs:
        key = (offer.id, a.price_per_hour_micros)
        row = rows.get(key)
        if row is None:
            row = rows[key] = StatementRow(
                node_id=offer.node_id,
                node_name=node_name,
                offer_id=offer.id,
                accelerator=offer.accelerator,
                region=offer.region,
                price_per_hour_micros=a.price_per_hour_micros,
                runs=0,
                usage_ms=0,
                exact_micros=Fraction(0),
            )
        row.runs += 1
        row.usage_ms += a.usage_ms
        row.exact_micros += usage_charge(a.usage_ms, a.price_per_hour_micros)
        energy, gco2, basis = footprint(a)
        row.energy_kwh += energy
        row.gco2 += gco2
        row.measured_runs += basis == "measured"
    return Statement(owner, start, end, list(rows.values()))
