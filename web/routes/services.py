"""Inference services: each one's replicas (where, on what, healthy, load), what its
callers saw over the last minute per user region, and its scale events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from broker.accounts.callers import check_role
from broker.db import SessionDep
from broker.models.account import Role
from broker.services import service as services
from broker.services import views
from broker.types import ObjectId
from web.render import WebRoute, page
from web.session import WebUserDep

router = APIRouter(route_class=WebRoute, include_in_schema=False)

PER_PAGE = 25


@router.get("/services")
def service_list(
    request: Request,
    session: SessionDep,
    user: WebUserDep,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> Response:
    account = check_role(user.account, Role.developer)
    rows, total = services.list_services(session, account, limit=PER_PAGE, offset=offset)
    return page(
        request,
        "services.html",
        user,
        services=[views.service_out(session, s) for s in rows],
        total=total,
        limit=PER_PAGE,
        offset=offset,
    )


@router.get("/services/{service_id}")
def service_page(
    request: Request, session: SessionDep, user: WebUserDep, service_id: ObjectId
) -> Response:
    account = check_role(user.account, Role.developer)
    detail = views.detail(session, services.get_service(session, account, service_id))
    return page(request, "service.html", user, s=detail)
