"""A short-lived cache for the order book, so a busy book costs one computation per
worker per ``BROKER_BOOK_CACHE_SECONDS`` instead of one per request.

The book is market data, not a reservation: nothing is bought from it, and
clearing rounds read the jobs and offers themselves. A copy up to that many
seconds old (plus the time one computation takes) is served, and its
``generated_at`` says when it was computed. A request that finds its copy too
old is still answered with it, at once, while a background thread computes the
next one; only the first request for a key waits for a computation. Each copy is
also kept as the JSON the API sends, so a request for the whole book costs no
serialization.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from broker.market.schemas import OrderBook

log = logging.getLogger(__name__)

MAX_ENTRIES = 64  # one per depth asked for; bounded against odd queries


@dataclass(frozen=True, slots=True)
class _Copy:
    book: OrderBook
    json: bytes  # the book as the API sends it, serialized once per copy
    started: float  # time.monotonic() when its reads began


class BookCache:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._entries: dict[Hashable, _Copy] = {}
        self._refreshing: set[Hashable] = set()
        self._lock = threading.Lock()
        self._refresher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="book-cache")

    def get(self, key: Hashable, compute: Callable[[], OrderBook]) -> OrderBook:
        """The cached book for ``key``; ``compute()`` makes a new one (in its own
        transaction: it may run after the request that asked for it has ended)."""
        return self._copy(key, compute).book

    def get_json(self, key: Hashable, compute: Callable[[], OrderBook]) -> bytes:
        """``get``'s book as JSON."""
        return self._copy(key, compute).json

    def cached_json(self, key: Hashable, compute: Callable[[], OrderBook]) -> bytes | None:
        """``get_json`` if a copy is cached (without waiting: an event loop may call
        it), else None."""
        copy = self._cached(key, compute)
        return copy.json if copy is not None else None

    def _copy(self, key: Hashable, compute: Callable[[], OrderBook]) -> _Copy:
        return self._cached(key, compute) or self._store(key, compute)

    def _cached(self, key: Hashable, compute: Callable[[], OrderBook]) -> _Copy | None:
        with self._lock:
            copy = self._entries.get(key)
            stale = copy is not None and time.monotonic() - copy.started >= self.seconds
            if stale and key not in self._refreshing:
                self._refreshing.add(key)
                self._refresher.submit(self._refresh, key, compute)
            return copy

    def _refresh(self, key: Hashable, compute: Callable[[], OrderBook]) -> None:
        try:
            self._store(key, compute)
        except Exception:
            log.exception("refreshing the order book failed; the previous copy is served")
        finally:
            with self._lock:
                self._refreshing.discard(key)

    def _store(self, key: Hashable, compute: Callable[[], OrderBook]) -> _Copy:
        started = time.monotonic()  # the copy is as old as the start of its reads
        book = compute()
        copy = _Copy(book, book.model_dump_json().encode(), started)
        with self._lock:
            if len(self._entries) >= MAX_ENTRIES and key not in self._entries:
                self._entries.clear()
            self._entries[key] = copy
        return copy
