"""The market: order books with their depth, clearing rounds and clearing prices."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from broker.db import SessionDep
from broker.market.carbon import footprints
from broker.market.service import list_rounds, order_book, price_history
from web.charts import carbon_chart, depth_chart, price_chart
from web.render import WebRoute, page
from web.session import WebUserDep

router = APIRouter(route_class=WebRoute, include_in_schema=False)

ROUNDS_PER_PAGE = 10
BOOK_DEPTH = 25


@router.get("/market")
def market(
    request: Request,
    session: SessionDep,
    user: WebUserDep,
    model: Annotated[str, Query(max_length=64)] = "",
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    round: Annotated[str, Query(pattern="^[A-Za-z0-9_-]{0,64}$")] = "",
) -> Response:
    books = order_book(session, depth=BOOK_DEPTH).books
    selected = next((b for b in books if b.accelerator == model), books[0] if books else None)
    rounds, total = list_rounds(session, limit=ROUNDS_PER_PAGE, offset=offset)
    history = price_history(session, selected.accelerator) if selected else []
    return page(
        request,
        "market.html",
        user,
        books=books,
        selected=selected,
        depth=depth_chart(selected) if selected else None,
        prices=price_chart(selected.accelerator, history) if selected else None,
        carbon=carbon_chart(footprints(session)),
        history=history,
        rounds=rounds,
        total=total,
        limit=ROUNDS_PER_PAGE,
        offset=offset,
        forced=round,
    )
