"""A search's page as the JSON the API sends, made from plain rows of the offers table.

``GET /v1/offers`` is a busy read. Building an ``OfferOut`` per row and letting
FastAPI check and serialize the page costs more than the query; here each row
becomes its JSON directly, byte for byte what ``Page[OfferOut]`` gives (the
tests compare them): pydantic's own encoder writes the numbers and times, and
the price is written as ``Usd`` writes it.

Each row's JSON is kept, by the row's values: the same offer unchanged is the
same row and costs a dictionary look-up, and an offer changed in any way (by
this process or another) is a different row, so what is kept is never stale.
(Values compare as Python compares them: 0.0 and -0.0 would be one, but no
offer's figures change between them.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic_core import to_json
from sqlalchemy import Select, select

from broker.models.offer import Offer
from broker.money import format_usd, micros_to_usd
from broker.offers.schemas import OfferOut
from broker.pagination import PageQuery

# The offers table's columns in OfferOut's order (the price in micro-dollars).
_COLUMN_OF = {"price_per_hour": "price_per_hour_micros", "kind": "fraction_kind"}
COLUMNS: Select[Any] = select(
    *(Offer.__table__.c[_COLUMN_OF.get(name, name)] for name in OfferOut.model_fields)
)
_FIELDS = tuple(OfferOut.model_fields)
_PRICE = _FIELDS.index("price_per_hour")

# Rows whose JSON is kept: a market's worth of offers, about 1.5 KB each (row and JSON),
# so at most some 15 MB; past that the lot is dropped and kept afresh.
MAX_KEPT = 10_000
_kept: dict[tuple[Any, ...], bytes] = {}


def page_json(rows: Sequence[tuple[Any, ...]], total: int, query: PageQuery) -> bytes:
    """``Page[OfferOut]``'s JSON for rows of ``COLUMNS``."""
    items = []
    for row in rows:
        # MIG offers' instance lists, as tuples, so that the row can be a key.
        key = tuple(tuple(v) if isinstance(v, list) else v for v in row)
        item = _kept.get(key)
        if item is None:
            item = _item_json(row)
            if len(_kept) >= MAX_KEPT:
                _kept.clear()
            _kept[key] = item
        items.append(item)
    return b'{"items":[%b],"total":%d,"limit":%d,"offset":%d}' % (
        b",".join(items),
        total,
        query.limit,
        query.offset,
    )


def _item_json(row: tuple[Any, ...]) -> bytes:
    item = dict(zip(_FIELDS, row, strict=True))
    item["price_per_hour"] = format_usd(micros_to_usd(row[_PRICE]))
    return to_json(item)
