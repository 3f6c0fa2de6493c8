"""The order book's short-lived cache: fresh copies are reused, old ones recomputed,
and a copy being recomputed is served meanwhile instead of waited for."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from broker.accounts.models import Role
from broker.market.cache import BookCache
from broker.market.schemas import OrderBook
from tests.conftest import ClientFactory
from tests.factories import make_account, make_offer


def _book() -> OrderBook:
    return OrderBook(books=[], generated_at=datetime.now(UTC))


def test_fresh_copies_are_reused_and_old_ones_recomputed() -> None:
    cache = BookCache(60)
    first = cache.get("all", _book)
    assert cache.get("all", _book) is first
    assert cache.get("h100", _book) is not first  # another query, another copy
    cache.seconds = 1e-9
    assert cache.get("all", _book) is not first


def test_no_cache_computes_every_time() -> None:
    cache = BookCache(0)
    assert cache.get("all", _book) is not cache.get("all", _book)


def test_the_old_copy_is_served_while_one_request_recomputes() -> None:
    cache = BookCache(60)
    old = cache.get("all", _book)
    cache.seconds = 1e-9
    computing, release = threading.Event(), threading.Event()
    fresh: list[OrderBook] = []

    def slow() -> OrderBook:
        computing.set()
        release.wait(10)
        return _book()

    refresher = threading.Thread(target=lambda: fresh.append(cache.get("all", slow)))
    refresher.start()
    assert computing.wait(10)
    assert cache.get("all", _book) is old  # not blocked, not computed twice
    release.set()
    refresher.join(10)
    assert len(fresh) == 1
    assert fresh[0] is not old


def test_the_api_serves_a_recent_copy(db: Session, client_for: ClientFactory) -> None:
    seller, _ = make_account(db, Role.provider)
    make_offer(db, seller, accelerator="h100-sxm", price_per_hour="2.00")
    _, key = make_account(db, Role.developer)
    client = client_for(key)
    client.app.state.book_cache = BookCache(60)  # type: ignore[attr-defined]
    first = client.get("/v1/market/book").json()
    make_offer(db, seller, accelerator="mi300x", price_per_hour="2.10")
    again = client.get("/v1/market/book").json()
    assert again == first  # the copy from a moment ago, generated_at and all
    other_depth = client.get("/v1/market/book", params={"depth": 10}).json()
    assert {b["accelerator"] for b in other_depth["books"]} == {"h100-sxm", "mi300x"}
