"""The order book's short-lived cache: fresh copies are reused, and an old one is
served at once while a background thread computes the next."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from sqlalchemy import Engine

from broker.db import transaction
from broker.market import service
from broker.market.cache import BookCache
from broker.market.schemas import OrderBook
from broker.models.account import Role
from tests.conftest import ClientFactory
from tests.factories import make_account, make_offer


def _book() -> OrderBook:
    return OrderBook(books=[], generated_at=datetime.now(UTC))


def test_fresh_copies_are_reused() -> None:
    cache = BookCache(60)
    first = cache.get(50, _book)
    assert cache.get(50, _book) is first
    assert cache.get(10, _book) is not first  # another depth, another copy


def test_an_old_copy_is_served_while_the_next_is_computed() -> None:
    cache = BookCache(60)
    old = cache.get(50, _book)
    cache.seconds = 1e-9
    computing, release = threading.Event(), threading.Event()
    computed: list[OrderBook] = []

    def slow() -> OrderBook:
        computing.set()
        release.wait(10)
        computed.append(_book())
        return computed[-1]

    assert cache.get(50, slow) is old  # answered at once
    assert computing.wait(10)
    assert cache.get(50, slow) is old  # not computed twice meanwhile
    release.set()
    cache._refresher.submit(lambda: None).result(10)  # the refresh has finished
    assert len(computed) == 1
    cache.seconds = 60
    assert cache.get(50, _book) is computed[0]


def test_a_failed_refresh_keeps_the_old_copy() -> None:
    cache = BookCache(60)
    old = cache.get(50, _book)
    cache.seconds = 1e-9

    def broken() -> OrderBook:
        raise RuntimeError("the database went away")

    assert cache.get(50, broken) is old
    cache._refresher.submit(lambda: None).result(10)
    assert cache.get(50, _book) is old  # served again, and a new refresh started


def test_the_api_serves_a_recent_copy(
    fresh_engine: Engine, fresh_client_for: ClientFactory
) -> None:
    with transaction(fresh_engine) as s:
        seller, _ = make_account(s, Role.provider)
        make_offer(s, seller, accelerator="h100-sxm", price_per_hour="2.00")
        _, key = make_account(s, Role.developer)
    client = fresh_client_for(key)
    client.app.state.book_cache = BookCache(60)  # type: ignore[attr-defined]
    answer = client.get("/v1/market/book")
    assert answer.headers["content-type"] == "application/json"
    first = answer.json()
    with transaction(fresh_engine, write=False) as s:  # the kept JSON is the book's
        assert first["books"] == service.order_book(s, None, 50).model_dump(mode="json")["books"]
    with transaction(fresh_engine) as s:
        make_offer(s, s.merge(seller), accelerator="mi300x", price_per_hour="2.10")
    assert client.get("/v1/market/book").json() == first  # generated_at and all
    deeper = client.get("/v1/market/book", params={"depth": 10}).json()
    assert {b["accelerator"] for b in deeper["books"]} == {"h100-sxm", "mi300x"}

    # One model's book is cut from the cached one, and is what it would be alone.
    one = client.get("/v1/market/book", params={"accelerator": "MI300X", "depth": 10}).json()
    with transaction(fresh_engine, write=False) as s:
        alone = service.order_book(s, "MI300X", 10).model_dump(mode="json")
    assert one["books"] == alone["books"]
