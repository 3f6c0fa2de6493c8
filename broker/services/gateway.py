"""The relay's plumbing, under the routes (``broker.services.router``): what a request
needs of its service, the caller's place, a web worker's vouch for a caller it
checked, passing a request on (to this ``broker serve``'s relay process, or to
another broker's relay that holds the service's replicas), a replica's
connection checked, and the relay's windows written to the database."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from datetime import timedelta
from typing import Any

import httpx
from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from broker.accounts.service import authenticate_key
from broker.config import Settings, get_settings
from broker.db import Transactions, utcnow
from broker.errors import BrokerError, InvalidInput
from broker.models.market import Allocation, AllocationStatus
from broker.models.offer import Offer
from broker.models.service import LIVE_STATES, Service, ServiceWindow
from broker.services.relay import Link, Relay, http_form
from solver.services import rtt_ms

log = logging.getLogger(__name__)


class ServiceUnavailable(BrokerError):
    status_code = 503
    code = "no_replica"


class ProgramError(BrokerError):
    status_code = 422
    code = "program_failed"


class GatewayTimeout(BrokerError):
    status_code = 504
    code = "replica_timeout"


class Known:
    """What a request needs of its service, kept a few seconds per process: a request
    costs no database read but its key's (checked in a batch)."""

    TTL_S = 5.0

    def __init__(self) -> None:
        self._rows: dict[str, tuple[float, dict[str, Any]]] = {}
        self._peers: dict[str, tuple[float, list[str]]] = {}

    def cached(self, service_id: str) -> dict[str, Any] | None:
        hit = self._rows.get(service_id)
        if hit is not None and time.monotonic() - hit[0] < self.TTL_S:
            return hit[1]
        return None

    def peers(self, transactions: Transactions, service_id: str, own: str | None) -> list[str]:
        """The relays of other brokers that wrote a window of one of the service's
        replicas lately (they hold its connection), newest first; kept a second."""
        now = time.monotonic()
        hit = self._peers.get(service_id)
        if hit is not None and now - hit[0] < 1.0:
            return hit[1]
        fresh = utcnow() - timedelta(seconds=3 * get_settings().service_window_s)
        with transactions(write=False) as session:
            rows = session.execute(
                select(ServiceWindow.relay, func.max(ServiceWindow.ended_at))
                .where(
                    ServiceWindow.service_id == service_id,
                    ServiceWindow.scope.startswith("replica:"),
                    ServiceWindow.relay.is_not(None),
                    ServiceWindow.ended_at > fresh,
                )
                .group_by(ServiceWindow.relay)
                .order_by(func.max(ServiceWindow.ended_at).desc())
            ).all()
        found = [r for r, _ in rows if r and r != own]
        self._peers[service_id] = (now, found)
        return found

    def read(self, transactions: Transactions, service_id: str) -> dict[str, Any] | None:
        now = time.monotonic()
        with transactions(write=False) as session:
            row = session.get(Service, service_id)
            info = None
            if row is not None:
                info = {
                    "account_id": row.account_id,
                    "users": list(row.users),
                    "slo": row.latency_slo_ms,
                    "live": row.state in LIVE_STATES,
                    "state": row.state.value,
                }
        if info is not None:
            self._rows[service_id] = (now, info)
        return info


def relay_of(app: Any) -> Relay:
    relay: Relay | None = getattr(app.state, "relay", None)
    if relay is None:
        settings = get_settings()
        relay = Relay(simulate_rtt=settings.relay_simulate_rtt, timeout_s=settings.infer_timeout_s)
        # Where other brokers' relays reach this one (None: they cannot).
        relay.address = getattr(app.state, "relay_address", None) or http_form(
            settings.relay_public_url
        )
        app.state.relay = relay
        app.state.services_known = Known()
    return relay


def caller_place(location: str | None, users: list[dict[str, Any]]) -> tuple[float, float, int]:
    """The caller's place (the header's, else the service's busiest region) and the
    service's user region nearest it."""
    if location:
        try:
            lat_text, lon_text = location.split(",")
            lat, lon = float(lat_text), float(lon_text)
        except ValueError:
            lat = lon = float("nan")
        if not (-90 <= lat <= 90 and -180 <= lon <= 180):
            raise InvalidInput(
                "X-Broker-Location must be 'lat,lon' in degrees", field="header.X-Broker-Location"
            )
    else:
        top = max(users, key=lambda u: float(u.get("share", 1.0)))
        lat, lon = float(top["lat"]), float(top["lon"])
    region = min(
        range(len(users)), key=lambda i: rtt_ms(lat, lon, users[i]["lat"], users[i]["lon"])
    )
    return lat, lon, region


# A web worker vouches for the caller it authenticated: "account id,admin,unix time"
# and its HMAC under the secret ``broker serve`` gave its processes.
_VOUCH = "x-broker-vouch"
_VOUCH_SIGNATURE = "x-broker-vouch-signature"
_VOUCH_SECONDS = 60


def _signature(secret: str, text: str) -> str:
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def vouched(request: Request, settings: Settings) -> tuple[str, bool] | None:
    """The caller a web worker vouched for, if the signature is good and recent."""
    text, signature = request.headers.get(_VOUCH), request.headers.get(_VOUCH_SIGNATURE)
    secret = settings.relay_secret.get_secret_value()
    if not (text and signature and secret):
        return None
    if not hmac.compare_digest(signature, _signature(secret, text)):
        return None
    account_id, admin, at = text.split(",")
    if abs(time.time() - float(at)) > _VOUCH_SECONDS:
        return None
    return account_id, admin == "1"


_PASSED_ON = ("authorization", "content-type", "content-length", "x-broker-location")
_FORWARDED = "x-broker-forwarded"  # passed from one broker's relay to another's: not again
_proxies: dict[str, httpx.AsyncClient] = {}


async def proxied(
    request: Request,
    settings: Settings,
    caller: tuple[str, bool],
    base_url: str | None = None,
    body: bytes | None = None,
) -> StreamingResponse:
    """The request passed on, vouched for, and its answer streamed back: to this
    ``broker serve``'s relay process (a web worker), or to another broker's relay
    that holds the service's replicas (``base_url``, with the ``body`` read)."""
    base_url = base_url or settings.relay_url
    proxy = _proxies.get(base_url)
    if proxy is None:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
        proxy = _proxies[base_url] = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(settings.infer_timeout_s + 5, connect=5),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )
    headers = {k: v for k, v in request.headers.items() if k.lower() in _PASSED_ON}
    secret = settings.relay_secret.get_secret_value()
    if secret:
        text = f"{caller[0]},{int(caller[1])},{time.time():.0f}"
        headers[_VOUCH], headers[_VOUCH_SIGNATURE] = text, _signature(secret, text)
    if body is not None:
        headers[_FORWARDED] = "1"
    outgoing = proxy.build_request(
        "POST",
        request.url.path,
        content=request.stream() if body is None else body,
        headers=headers,
    )
    try:
        answer = await proxy.send(outgoing, stream=True)
    except httpx.HTTPError as e:
        raise ServiceUnavailable(f"the broker's relay at {base_url} is not reachable ({e})") from e
    kept = {k: v for k, v in answer.headers.items() if k.lower().startswith("x-broker-")}
    return StreamingResponse(
        answer.aiter_raw(),
        status_code=answer.status_code,
        media_type=answer.headers.get("content-type"),
        headers=kept,
        background=BackgroundTask(answer.aclose),
    )


async def elsewhere(
    request: Request,
    transactions: Transactions,
    caller: tuple[str, bool],
    service_id: str,
    body: bytes,
) -> Response | None:
    """With no replica of the service connected here: the request passed to another
    broker's relay that has one (several ``broker serve`` on one database), or None."""
    if request.headers.get(_FORWARDED):
        return None  # it came from another relay: passing it on again could go round
    known: Known = request.app.state.services_known
    relay = relay_of(request.app)
    peers = await run_in_threadpool(known.peers, transactions, service_id, relay.address)
    settings = get_settings()
    for peer in peers:
        with contextlib.suppress(ServiceUnavailable):  # that one is away: the next
            return await proxied(request, settings, caller, peer, body)
    return None


def replica_link(transactions: Transactions, key: str, allocation_id: str) -> Link | str:
    """The link for a replica's connection, or why it may not connect."""
    with transactions(write=False) as session:
        owner = authenticate_key(session, key)
        if owner is None or owner.node_id is None:
            return "a replica connects with its node's key"
        row = session.execute(
            select(Allocation, Offer, Service.id)
            .join(Offer, Offer.id == Allocation.offer_id)
            .join(Service, Service.id == _job_service(Allocation.job_id))
            .where(Allocation.id == allocation_id)
        ).first()
        if row is None:
            return f"allocation {allocation_id} is no replica of a service"
        allocation, offer, service_id = row
        if offer.node_id != owner.node_id:
            return f"allocation {allocation_id} is not this node's"
        if allocation.status != AllocationStatus.active:
            return f"allocation {allocation_id} has ended"

        async def unset(_: bytes) -> None:  # replaced once the socket is accepted
            raise RuntimeError("not connected")

        return Link(allocation_id, service_id, offer.lat, offer.lon, unset)


def _job_service(job_id: Any) -> Any:
    from broker.models.job import Job

    return select(Job.service_id).where(Job.id == job_id).scalar_subquery()


def _store_windows(transactions: Transactions, rows: list[dict[str, Any]]) -> None:
    with transactions(write=True) as session:
        session.execute(ServiceWindow.__table__.insert(), rows)  # type: ignore[attr-defined]


async def write_windows(app: Any) -> None:
    """Every ``BROKER_SERVICE_WINDOW_S``, what this process's relay measured goes to the
    database (for the autoscaler and the dashboard); runs while the app does."""
    while True:
        await asyncio.sleep(get_settings().service_window_s)
        relay: Relay | None = getattr(app.state, "relay", None)
        if relay is None or relay.transactions is None:
            continue
        rows = relay.window()
        if not rows:
            continue
        try:
            await run_in_threadpool(_store_windows, relay.transactions, rows)
        except Exception:  # the database is away: these figures are lost, serving goes on
            log.exception("could not store %d service window(s)", len(rows))
