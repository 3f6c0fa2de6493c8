"""Rate limits per API key: a token bucket each, refilled at a steady rate.

A key may send ``rate`` requests a second on average and bursts of ``burst``;
past that it gets 429 with ``Retry-After`` (whole seconds until the next token).
Requests without a key are limited per client address. Buckets are keyed by a
digest of the key, never the key itself.

The buckets live in each server process: with N worker processes a key may
send up to N times the rate in total. Limits shared across processes and
replicas belong in front of the broker (a proxy) or in a shared store; the
per-process limit still keeps one client from starving the others.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict

from starlette.types import ASGIApp, Receive, Scope, Send

from broker.errors import error_body
from broker.observability import RATE_LIMITED

_MAX_BUCKETS = 100_000  # the least recently used are forgotten past this


class RateLimit:
    """ASGI middleware limiting ``/v1`` requests per key (``rate`` 0 turns it off)."""

    def __init__(self, app: ASGIApp, rate: float, burst: int) -> None:
        self.app = app
        self.rate = rate
        self.burst = max(1, burst)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.rate <= 0 or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        wait = self._take(self._who(scope))
        if wait <= 0:
            await self.app(scope, receive, send)
            return
        RATE_LIMITED.inc()
        retry = max(1, math.ceil(wait))
        body = error_body(
            "rate_limited",
            f"too many requests with this API key: at most {self.rate:g} a second on "
            f"average, in bursts of {self.burst}; retry after {retry} s",
        )
        payload = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"retry-after", str(retry).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    @staticmethod
    def _who(scope: Scope) -> str:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                return "key:" + hashlib.sha256(value).hexdigest()[:32]
        client = scope.get("client")
        return f"addr:{client[0] if client else '?'}"

    def _take(self, who: str) -> float:
        """Take a token; returns 0, or the seconds until one is free."""
        now = time.monotonic()
        tokens, last = self._buckets.pop(who, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._buckets[who] = (tokens - 1, now)
            wait = 0.0
        else:
            self._buckets[who] = (tokens, now)
            wait = (1 - tokens) / self.rate
        if len(self._buckets) > _MAX_BUCKETS:
            self._buckets.popitem(last=False)
        return wait
