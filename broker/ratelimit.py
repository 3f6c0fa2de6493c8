"""Rate limits per caller: a token bucket each, refilled at a steady rate.

A caller is who the key authenticated as, not the header's bytes: an account for
its own keys (all its keys share one bucket), a node for a node key. The key in
the header is read the way authentication reads it (``Bearer`` in any case, the
key with the spaces around it stripped) and looked up by its SHA-256 digest, the
same digest the database keeps, in a table of keys this process has seen
authenticate (``remember_key``). A request whose key this process has not seen
authenticate (none, a new key, a made-up one) is limited per client address,
at the anonymous rate, before it reaches the database: rotating random keys buys
nothing but the address's own small budget. A key that fails to authenticate
(revoked, unknown) is forgotten (``forget_key``), so a leaked key that was revoked
cannot spend its former account's budget.

A caller may send ``rate`` requests a second on average and bursts of ``burst``;
past that it gets 429 with ``Retry-After`` (whole seconds until the next token).

Where the buckets live is ``broker.buckets``'s business: on PostgreSQL in a table
every process of every replica shares (a caller gets its rate in total, however
many replicas serve it); with the embedded SQLite default in each server process
(with N worker processes a caller may send up to N times the rate in total).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict

import anyio.to_thread
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.buckets import Buckets, MemoryBuckets
from broker.errors import error_body
from broker.observability import RATE_LIMITED

_MAX_KEYS = 100_000

# Digest of a key -> who it authenticated as, for keys this process has seen pass.
_known: OrderedDict[str, str] = OrderedDict()
_known_lock = threading.Lock()


def remember_key(digest: str, identity: str) -> None:
    """Key ``digest`` (``broker.accounts.service.hash_key``) authenticated as
    ``identity`` ("account:..." or "node:..."); its requests now count against
    that identity's bucket."""
    with _known_lock:
        _known[digest] = identity
        _known.move_to_end(digest)
        if len(_known) > _MAX_KEYS:
            _known.popitem(last=False)


def forget_key(digest: str) -> None:
    """Key ``digest`` failed to authenticate: its requests count per address again."""
    with _known_lock:
        _known.pop(digest, None)


def _identity(digest: str) -> str | None:
    with _known_lock:
        return _known.get(digest)


def bearer_digest(scope: Scope) -> str | None:
    """The SHA-256 of the request's bearer key, read as ``fastapi.security.HTTPBearer``
    and authentication read it; None without one."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            key = key.strip()
            if scheme.lower() != "bearer" or not key:
                return None
            return hashlib.sha256(key.encode()).hexdigest()
    return None


def _limited(scope: Scope) -> bool:
    path: str = scope["path"]
    if path.startswith("/v1/") or path == "/metrics":
        return True
    # Signing in to the dashboard tries a key against the database.
    return path == "/signin" and scope.get("method") == "POST"


class RateLimit:
    """ASGI middleware limiting ``/v1``, ``/metrics`` and sign-in requests per caller
    (``rate`` 0 turns it off); requests without a known key get ``anonymous_rate``
    per client address."""

    def __init__(
        self,
        app: ASGIApp,
        rate: float,
        burst: int,
        anonymous_rate: float | None = None,
        anonymous_burst: int | None = None,
        buckets: Buckets | None = None,
    ) -> None:
        self.app = app
        self.buckets = buckets or MemoryBuckets()
        self.rate = rate
        self.burst = max(1, burst)
        self.anonymous_rate = rate if anonymous_rate is None else anonymous_rate
        self.anonymous_burst = max(1, anonymous_burst or self.burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.rate <= 0 or not _limited(scope):
            await self.app(scope, receive, send)
            return
        digest = bearer_digest(scope)
        identity = _identity(digest) if digest else None
        if identity is not None:
            wait, what = await self._take(identity, self.rate, self.burst), "API key's account"
            rate, burst = self.rate, self.burst
        else:
            client = scope.get("client")
            address = f"address:{client[0] if client else '?'}"
            rate, burst = self.anonymous_rate, self.anonymous_burst
            wait = await self._take(address, rate, burst)
            what = "client address (no known API key)"
        if wait <= 0:
            await self.app(scope, receive, send)
            # A key that authenticated just now: this request counts for its owner
            # too, so that a caller's first request is charged like the others.
            if identity is None and digest is not None and (found := _identity(digest)):
                await self._take(found, self.rate, self.burst)
            return
        RATE_LIMITED.inc()
        retry = max(1, math.ceil(wait))
        body = error_body(
            "rate_limited",
            f"too many requests from this {what}: at most {rate:g} a second on "
            f"average, in bursts of {burst}; retry after {retry} s",
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

    async def _take(self, who: str, rate: float, burst: int) -> float:
        """Take a token; returns 0, or the seconds until one is free."""
        if self.buckets.shared:  # a database round trip: off the event loop
            return await anyio.to_thread.run_sync(self.buckets.take, who, rate, burst)
        return self.buckets.take(who, rate, burst)
