"""Operations: request ids, structured logs and Prometheus metrics.

Every request gets an id (the caller's ``X-Request-ID`` when it sends a sane
one, else a new one), echoed in the response and attached to every log record
written while the request is handled. ``broker serve`` logs one JSON object per
line (``BROKER_LOG_FORMAT=text`` for people), including an access line per
request with its route, status and duration (agents' routine requests at debug
level: they log what matters themselves, and a market with agents is not a wall of
their polls). API keys
never reach the logs:
the access line names the route template and the account, never a header.

``/metrics`` serves Prometheus' text format: request counts and latencies by
route, clearing rounds (count, solve time, matches), and the market's state
read from the database (queue depth, free accelerators, nodes by status), at
most once every ``BROKER_METRICS_CACHE_SECONDS`` per process, so scrapes cost the
database next to nothing. It answers the bearer token ``BROKER_METRICS_TOKEN``
or, without one set, only clients on this machine (``check_metrics_access``).
With several worker processes the counters are shared through
``PROMETHEUS_MULTIPROC_DIR`` (set by ``broker serve --workers N``).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.logformat import TextFormatter, quiet_jax

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
access_log = logging.getLogger("broker.access")

HTTP_REQUESTS = Counter(
    "broker_http_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "broker_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["method", "route"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ROUNDS = Counter("broker_clearing_rounds_total", "Clearing rounds", ["trigger", "status"])
SOLVE_SECONDS = Histogram(
    "broker_clearing_solve_seconds",
    "Solver time per clearing round",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
MATCHED = Counter("broker_clearing_matched_total", "Jobs matched by clearing rounds")
RATE_LIMITED = Counter("broker_rate_limited_total", "Requests refused with 429")


def observe_round(trigger: str, status: str, solve_seconds: float | None, matched: int) -> None:
    ROUNDS.labels(trigger, status).inc()
    if solve_seconds is not None:
        SOLVE_SECONDS.observe(solve_seconds)
    MATCHED.inc(matched)


class RequestContext:
    """ASGI middleware: the request id, the access line and the request metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SANE_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500

        async def tagged_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, tagged_send)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            HTTP_REQUESTS.labels(method, template, str(status)).inc()
            HTTP_LATENCY.labels(method, template).observe(elapsed)
            if template not in ("/healthz", "/readyz", "/metrics"):
                account = scope.get("state", {}).get("account_id")
                # Agents poll for work, report progress and fetch programs all the time,
                # and log what matters themselves: their routine answers are debug
                # lines, their refusals and errors are not.
                routine = status < 400 and (
                    template.startswith(_AGENT_ROUTES) or (method, template) in _AGENT_FETCHES
                )
                access_log.log(
                    logging.DEBUG if routine else logging.INFO,
                    "%s %s %d",
                    method,
                    template,
                    status,
                    extra={
                        "method": method,
                        "route": template,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                        "account_id": account,
                    },
                )
            request_id.reset(token)


_AGENT_ROUTES = ("/v1/allocations", "/v1/nodes")
_AGENT_FETCHES = frozenset(
    {("GET", "/v1/artifacts/{sha256}/content"), ("GET", "/v1/arrays/{sha256}/content")}
)
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def check_metrics_access(client_host: str | None, authorization: str | None) -> None:
    """Let a scrape through, or raise: with ``BROKER_METRICS_TOKEN`` set, the request
    must carry it as a bearer token; without, it must come from this machine."""
    from broker.config import get_settings
    from broker.errors import Forbidden, Unauthorized

    token = get_settings().metrics_token
    if token is None:
        if client_host not in _LOOPBACK:
            raise Forbidden(
                "/metrics answers only clients on this machine; set BROKER_METRICS_TOKEN "
                "and send it ('Authorization: Bearer <token>') to scrape from elsewhere"
            )
        return
    scheme, _, given = (authorization or "").partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        raise Unauthorized("send the metrics token: 'Authorization: Bearer <BROKER_METRICS_TOKEN>'")


# Database -> (when read, the market's gauges): scrapes within the cache time reuse them.
_market_cache: dict[str, tuple[float, list[GaugeMetricFamily]]] = {}
_market_lock = threading.Lock()


class MarketCollector(Collector):
    """The market's state, read from the database when Prometheus scrapes, at most once
    every ``max_age`` seconds per process and database."""

    def __init__(self, session: Session, max_age: float = 0.0) -> None:
        self.session = session
        self.max_age = max_age

    def collect(self) -> Iterator[GaugeMetricFamily]:
        bind = self.session.get_bind()
        where = str(bind.engine.url)
        with _market_lock:
            cached = _market_cache.get(where)
            if cached is not None and time.monotonic() - cached[0] < self.max_age:
                yield from cached[1]
                return
        families = self._read()
        with _market_lock:
            _market_cache[where] = (time.monotonic(), families)
        yield from families

    def _read(self) -> list[GaugeMetricFamily]:
        from broker.models.job import Job
        from broker.models.node import Node
        from broker.models.offer import Offer, OfferStatus

        jobs = GaugeMetricFamily("broker_jobs", "Jobs by state", labels=["state"])
        offers = GaugeMetricFamily(
            "broker_free_accelerators",
            "Free accelerators on active offers, by model",
            labels=["accelerator"],
        )
        nodes = GaugeMetricFamily("broker_nodes", "Provider nodes by status", labels=["status"])
        session = self.session
        for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state)):
            jobs.add_metric([str(state)], n)
        for model, free in session.execute(
            select(Offer.accelerator, func.sum(Offer.count))
            .where(Offer.status == OfferStatus.active)
            .group_by(Offer.accelerator)
        ):
            offers.add_metric([model], float(free or 0))
        for status, n in session.execute(select(Node.status, func.count()).group_by(Node.status)):
            nodes.add_metric([str(status)], n)
        return [jobs, offers, nodes]


def metrics_text(session: Session, max_age: float = 0.0) -> tuple[bytes, str]:
    """The metrics of this process, or of all workers when they share a directory; the
    market's figures at most ``max_age`` seconds old."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = CollectorRegistry()
        registry.register(_Forward(REGISTRY))
    registry.register(MarketCollector(session, max_age))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        yield from self.registry.collect()


# ---- logs -------------------------------------------------------------------------

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's copy of the message with terminal colours
}


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and value is not None:
                entry[key] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    """Route the broker's and uvicorn's logs to stderr, as JSON lines or text."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = TextFormatter()
        if level.upper() != "DEBUG":
            handler.addFilter(quiet_jax)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Our access line has the request id and route; uvicorn's would repeat it without.
    logging.getLogger("uvicorn.access").disabled = True
    access_log.disabled = os.environ.get("BROKER_ACCESS_LOG") == "0"  # serve --no-access-log
