"""Who may read which rows: the one rule, and a readable statement per table.

Admins read every row; every other account reads its own (the jobs it submitted,
the offers and nodes it lists, its invoices). Offers are the exception that
makes a market: any account reads an active offer. ``None`` is the operator
(the ``broker`` command, with the database at hand), who reads all, as admins do.
Services start their queries here instead of checking roles themselves.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, Select, or_, select
from sqlalchemy.orm import InstrumentedAttribute

from broker.models.account import Account, Role
from broker.models.billing import Invoice
from broker.models.job import Job
from broker.models.node import Node
from broker.models.offer import Offer, OfferStatus


def sees_all(viewer: Account | None) -> bool:
    """Whether ``viewer`` reads every row (an admin, or the operator)."""
    return viewer is None or viewer.role == Role.admin


def owns(viewer: Account | None, owner_id: str | None) -> bool:
    """Whether ``viewer`` may read a row owned by ``owner_id``."""
    return sees_all(viewer) or (viewer is not None and owner_id == viewer.id)


def own_rows(
    viewer: Account | None, owner: InstrumentedAttribute[str]
) -> list[ColumnElement[bool]]:
    """The conditions that keep a query to ``viewer``'s rows (none for an admin)."""
    return [] if viewer is None or sees_all(viewer) else [owner == viewer.id]


def readable_jobs(viewer: Account) -> Select[Job]:
    return select(Job).where(*own_rows(viewer, Job.account_id))


def readable_nodes(viewer: Account) -> Select[Node]:
    return select(Node).where(*own_rows(viewer, Node.provider_id))


def readable_invoices(viewer: Account) -> Select[Invoice]:
    return select(Invoice).where(*own_rows(viewer, Invoice.account_id))


def changeable_offers(viewer: Account) -> Select[Offer]:
    """The offers ``viewer`` may change: its own (an admin: any)."""
    return select(Offer).where(*own_rows(viewer, Offer.provider_id))


def readable_offers(viewer: Account) -> Select[Offer]:
    """The offers ``viewer`` may read: any active one, its own, any for an admin."""
    if sees_all(viewer):
        return select(Offer)
    return select(Offer).where(
        or_(Offer.status == OfferStatus.active, Offer.provider_id == viewer.id)
    )
