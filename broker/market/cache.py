"""A short-lived cache for the order book, so a busy book costs one computation per
worker per ``BROKER_BOOK_CACHE_SECONDS`` instead of one per request.

The book is market data, not a reservation: nothing is bought from it, and
clearing rounds read the jobs and offers themselves. A book up to that many
seconds old (plus the time one computation takes) is served, and its
``generated_at`` says when it was computed. While one request computes a fresh
copy, others get the previous one instead of waiting for it or computing it
too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable

from broker.market.schemas import OrderBook

MAX_ENTRIES = 256  # one per (model, depth) asked for; bounded against odd queries


class BookCache:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._entries: dict[Hashable, tuple[OrderBook, float]] = {}
        self._refreshing: set[Hashable] = set()
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], OrderBook]) -> OrderBook:
        """The cached book for ``key``, or ``compute()``'s when there is none fresh enough."""
        if self.seconds <= 0:
            return compute()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and (
                time.monotonic() - entry[1] < self.seconds or key in self._refreshing
            ):
                return entry[0]
            self._refreshing.add(key)
        try:
            started = time.monotonic()  # the copy is as old as the start of its reads
            book = compute()
            with self._lock:
                if len(self._entries) >= MAX_ENTRIES and key not in self._entries:
                    self._entries.clear()
                self._entries[key] = (book, started)
            return book
        finally:
            with self._lock:
                self._refreshing.discard(key)
