"""A provider's nodes and offers: listing capacity, changing the ask, withdrawing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import ValidationError

from broker.accounts.callers import check_role
from broker.accounts.visibility import sees_all
from broker.db import SessionDep
from broker.errors import BrokerError, NotFound
from broker.models.account import Account, Role
from broker.models.node import NodeStatus
from broker.models.offer import OfferStatus
from broker.nodes.schemas import NodeQuery
from broker.nodes.service import list_nodes
from broker.offers import service
from broker.offers.schemas import OfferCreate, OfferOut, OfferQuery, OfferSort, OfferUpdate
from broker.types import ObjectId
from web.format import amount
from web.forms import attempt, choice, given, text, values
from web.render import WebRoute, form_errors, page, redirect
from web.session import CheckedForm, WebUser, WebUserDep

router = APIRouter(route_class=WebRoute, include_in_schema=False)

PER_PAGE = 20
OFFER_FIELDS = (
    "accelerator",
    "count",
    "price_per_hour",
    "region",
    "country",
    "lat",
    "lon",
    "available_hours",
)


def _provider(user: WebUser) -> Account:
    return check_role(user.account, Role.provider)


@dataclass(frozen=True)
class NodeView:
    """A node and what its devices report: how many, how healthy, how busy."""

    node: Any
    devices: int
    healthy: int
    utilization: float | None


@router.get("/nodes")
def nodes(
    request: Request,
    session: SessionDep,
    user: WebUserDep,
    status: Annotated[str, Query(max_length=16)] = "",
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> Response:
    wanted = choice(NodeStatus, status, "status")
    rows, total = list_nodes(
        session, _provider(user), NodeQuery(status=wanted, limit=PER_PAGE, offset=offset)
    )
    views = []
    for node in rows:
        devices = node.devices or []
        busy = [float(d["utilization"]) for d in devices if d.get("utilization") is not None]
        views.append(
            NodeView(
                node=node,
                devices=sum(int(d.get("count", 1)) for d in devices),
                healthy=sum(int(d.get("count", 1)) for d in devices if d.get("healthy", True)),
                utilization=sum(busy) / len(busy) if busy else None,
            )
        )
    return page(
        request,
        "nodes.html",
        user,
        views=views,
        total=total,
        limit=PER_PAGE,
        offset=offset,
        status=status,
        statuses=[s.value for s in NodeStatus],
    )


def _offers_page(
    request: Request,
    session: SessionDep,
    user: WebUser,
    status: OfferStatus | None,
    offset: int,
    form: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
    notice: str = "",
    changed: str = "",
) -> Response:
    account = _provider(user)
    query = OfferQuery(
        mine=not sees_all(account),
        status=status,
        sort=OfferSort.newest,
        limit=PER_PAGE,
        offset=offset,
    )
    rows, total = service.search_offers(session, account, query)
    return page(
        request,
        "offers.html",
        user,
        status_code=422 if errors else 200,
        offers=[OfferOut.model_validate(o) for o in rows],
        total=total,
        limit=PER_PAGE,
        offset=offset,
        status=status.value if status else "",
        statuses=[s.value for s in OfferStatus],
        form=form or {"efficiency": "0.4"},
        errors=errors or {},
        notice=notice,
        changed=changed,
    )


@router.get("/offers")
def offers(
    request: Request,
    session: SessionDep,
    user: WebUserDep,
    status: Annotated[str, Query(max_length=16)] = "",
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    notice: Annotated[str, Query(pattern="^(listed|changed|withdrawn)?$")] = "",
    offer: Annotated[str, Query(pattern="^[A-Za-z0-9_-]{0,64}$")] = "",
) -> Response:
    wanted = choice(OfferStatus, status, "status")
    return _offers_page(request, session, user, wanted, offset, notice=notice, changed=offer)


@router.post("/offers")
def create_offer(
    request: Request, session: SessionDep, user: WebUserDep, form: CheckedForm
) -> Response:
    account = _provider(user)
    fields = given(form, OFFER_FIELDS)
    if "country" in fields:
        fields["country"] = fields["country"].upper()
    try:
        data = OfferCreate.model_validate(fields)
        offer = attempt(session, lambda: service.create_offer(session, account, data))
    except (ValidationError, BrokerError) as e:
        return _offers_page(request, session, user, None, 0, values(form), form_errors(e))
    return redirect("/offers", notice="listed", offer=offer.id)


def _offer_page(
    request: Request,
    session: SessionDep,
    user: WebUser,
    offer_id: str,
    form: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
    status: int = 200,
) -> Response:
    offer = OfferOut.model_validate(service.get_own_offer(session, _provider(user), offer_id))
    current = {
        "price_per_hour": amount(offer.price_per_hour),
        "capacity": str(offer.capacity),
        "available_hours": "" if offer.available_hours is None else f"{offer.available_hours:g}",
        "efficiency": f"{offer.efficiency:g}",
    }
    return page(
        request,
        "offer.html",
        user,
        status_code=status,
        offer=offer,
        form=form or current,
        errors=errors or {},
    )


@router.get("/offers/{offer_id}")
def offer(request: Request, session: SessionDep, user: WebUserDep, offer_id: ObjectId) -> Response:
    return _offer_page(request, session, user, offer_id)


@router.post("/offers/{offer_id}")
def update_offer(
    request: Request, session: SessionDep, user: WebUserDep, offer_id: ObjectId, form: CheckedForm
) -> Response:
    account = _provider(user)
    fields: dict[str, Any] = given(form, ("price_per_hour", "capacity", "efficiency"))
    # The form shows the current limit; left blank, the offer has none.
    fields["available_hours"] = text(form, "available_hours") or None
    try:
        data = OfferUpdate.model_validate(fields)
        attempt(session, lambda: service.update_offer(session, account, offer_id, data))
    except (ValidationError, BrokerError) as e:
        if isinstance(e, NotFound):
            raise
        status = e.status_code if isinstance(e, BrokerError) else 422
        return _offer_page(request, session, user, offer_id, values(form), form_errors(e), status)
    return redirect("/offers", notice="changed", offer=offer_id)


@router.post("/offers/{offer_id}/withdraw")
def withdraw(session: SessionDep, user: WebUserDep, offer_id: ObjectId, _: CheckedForm) -> Response:
    service.withdraw_offer(session, _provider(user), offer_id)
    return redirect("/offers", notice="withdrawn", offer=offer_id)
