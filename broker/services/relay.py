"""The relay: each request to a service goes to one of its replicas over the
connection that replica holds to the broker, and the answer comes back the same way.

Why a relay, not calls to the replicas: a provider's machine is behind its own
network (NAT, a firewall, a cluster without ingress); the broker cannot reach
it, but it can always reach the broker, as its agent already does. So each
replica's agent opens a WebSocket to the broker (``/v1/replicas/{id}/connect``)
and keeps it; requests go down it and answers come up it, many in flight at
once. The same connection is the replica's health: when it closes (the agent
was killed, the machine lost its network), the replica stops getting requests
at once, long before the node sweep declares the node lost.

A request goes to the replica it would be answered soonest by: the modelled
round trip from the caller to the replica (the market's rule) plus the work
queued there times the replica's recent time per request. One whose replica
goes away, or fails for a reason of the machine's, is sent again to another
(at most ``ATTEMPTS`` in all); a failure of the program's (bad arguments, an
error in it) is the caller's answer. Answers stream: a replica sends a large
result in chunks and each is passed on as it arrives.

Frames, both ways, are one binary WebSocket message each: a 4-byte big-endian
header length, a JSON header, then bytes. Down: ``{"id"}`` and the arguments (an
arrays bundle). Up: ``{"id", "ok", "more", "ms"}`` (``ms``: time in the replica)
and a chunk of the result, or ``{"id", "ok": false, "error", "program"}``.

The relay measures what callers see and, every few seconds, writes it to the
database as windows (``ServiceWindow``), which the autoscaler and the dashboard
read; a connected replica writes a window even when idle, as its heartbeat.
How often: ``BROKER_SERVICE_WINDOW_S``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker.sdk.frames import pack, unpack
from solver.services import rtt_ms

log = logging.getLogger(__name__)

ATTEMPTS = 3
RECENT_S = 600.0  # a service's windows go on this long after its last replica left


def http_form(url: str) -> str | None:
    """A relay's public URL as an HTTP base (agents get its ws:// form); None for none."""
    if not url:
        return None
    return ("http" + url[2:] if url.startswith("ws") else url).rstrip("/")


class NoReplica(Exception):
    """No replica of the service is connected (or none is left to try)."""


class ProgramFailed(Exception):
    """The replica ran the request and the program refused or failed it."""


class ReplicaGone(Exception):
    """The replica went away mid-answer (after its first chunk: too late to retry)."""


_GONE: tuple[dict[str, Any], bytes] = ({"gone": True}, b"")


@dataclass(eq=False)
class Link:
    """One replica's connection, and what the relay knows of it."""

    allocation_id: str
    service_id: str
    lat: float
    lon: float
    send: Callable[[bytes], Awaitable[None]]
    inflight: int = 0
    ms_per_request: float = 5.0  # a moving average of its time per request
    pending: dict[int, asyncio.Queue[tuple[dict[str, Any], bytes]]] = field(default_factory=dict)
    closed: bool = False
    # The integral of requests in it over time since the last window, for the mean.
    area: float = 0.0
    changed_at: float = field(default_factory=time.monotonic)
    answered: int = 0

    def _count(self, delta: int) -> None:
        now = time.monotonic()
        self.area += self.inflight * (now - self.changed_at)
        self.changed_at = now
        self.inflight += delta

    def expected_ms(self, lat: float, lon: float) -> float:
        return rtt_ms(lat, lon, self.lat, self.lon) + (self.inflight + 1) * self.ms_per_request

    def deliver(self, frame: bytes) -> None:
        header, body = unpack(frame)
        queue = self.pending.get(int(header.get("id", -1)))
        if queue is not None:
            queue.put_nowait((header, bytes(body)))

    def close(self) -> None:
        self.closed = True
        for queue in self.pending.values():
            queue.put_nowait(_GONE)


@dataclass
class _Sample:
    region: int
    link: str
    total_ms: float
    replica_ms: float
    ok: bool
    retries: int
    within_slo: bool


@dataclass
class Target:
    """Where a request comes from and what its service promises."""

    service_id: str
    lat: float
    lon: float
    region: int  # the service's user region nearest the caller
    slo_ms: float


@dataclass
class Answer:
    """A replica's answer, streamed: the first chunk has come (so it did not fail)."""

    link: Link
    header: dict[str, Any]
    retries: int
    _first: bytes
    _queue: asyncio.Queue[tuple[dict[str, Any], bytes]]
    _done: Callable[[bool], None]

    def whole(self) -> bytes | None:
        """The answer, when its first chunk is all of it (and the request is done)."""
        if self.header.get("more"):
            return None
        self._done(True)
        return self._first

    async def chunks(self) -> AsyncIterator[bytes]:
        header, chunk, ok = self.header, self._first, False
        try:
            while True:
                yield chunk
                if not header.get("more"):
                    ok = True
                    return
                header, chunk = await self._queue.get()
                if header.get("gone") or not header.get("ok", True):
                    raise ReplicaGone(
                        f"replica {self.link.allocation_id} went away while sending its answer"
                    )
        finally:
            self._done(ok)


class Relay:
    """The relay of one broker process (see the module)."""

    def __init__(self, *, simulate_rtt: bool = False, timeout_s: float = 60.0) -> None:
        self.links: dict[str, Link] = {}
        self.by_service: dict[str, list[Link]] = defaultdict(list)
        self.simulate_rtt = simulate_rtt
        self.timeout_s = timeout_s
        self._next_id = 0
        self._samples: dict[str, list[_Sample]] = defaultdict(list)
        self._window_started = time.monotonic()
        # Services that had a replica here lately, and when: their windows go on a while
        # after their last replica went, so that its silence is seen against them.
        self._recent: dict[str, float] = {}
        # How this process reaches the database, for the windows (set by the routes).
        self.transactions: Any = None
        # Where other brokers' relays reach this one: its replicas' windows say so, and
        # a broker without a replica of a service passes its requests here.
        self.address: str | None = None

    # -- replicas -------------------------------------------------------------------

    def attach(self, link: Link) -> None:
        old = self.links.pop(link.allocation_id, None)
        if old is not None:  # the same replica connecting again: the new one wins
            self._drop(old)
        self.links[link.allocation_id] = link
        self.by_service[link.service_id].append(link)
        log.info("replica %s of %s connected", link.allocation_id, link.service_id)

    def detach(self, link: Link) -> None:
        self._recent[link.service_id] = time.monotonic()
        if self.links.get(link.allocation_id) is link:
            del self.links[link.allocation_id]
        self._drop(link)
        log.info("replica %s of %s disconnected", link.allocation_id, link.service_id)

    def _drop(self, link: Link) -> None:
        links = self.by_service.get(link.service_id, [])
        if link in links:
            links.remove(link)
        link.close()

    def connected(self, service_id: str) -> int:
        return len(self.by_service.get(service_id, ()))

    # -- requests -------------------------------------------------------------------

    def _choose(self, target: Target, tried: set[str]) -> Link | None:
        links = [
            k
            for k in self.by_service.get(target.service_id, ())
            if not k.closed and k.allocation_id not in tried
        ]
        if not links:
            return None
        return min(links, key=lambda k: k.expected_ms(target.lat, target.lon))

    async def request(self, target: Target, body: bytes) -> Answer:
        """Send ``body`` to the best replica, and to another when that one goes away
        or fails for the machine's reason; the answer's first chunk has come."""
        tried: set[str] = set()
        began = time.perf_counter()
        last = "no replica of it is connected yet (it is starting, or none is placed)"
        for attempt in range(ATTEMPTS):
            link = self._choose(target, tried)
            if link is None:
                break
            tried.add(link.allocation_id)
            rtt = rtt_ms(target.lat, target.lon, link.lat, link.lon)
            self._next_id += 1
            rid = self._next_id
            queue: asyncio.Queue[tuple[dict[str, Any], bytes]] = asyncio.Queue()
            link.pending[rid] = queue
            link._count(+1)
            measured = [0.0]  # the replica's time, once it has answered
            finished = [False]

            def done(
                ok: bool,
                link: Link = link,
                rid: int = rid,
                rtt: float = rtt,
                attempt: int = attempt,
                measured: list[float] = measured,
                finished: list[bool] = finished,
            ) -> None:
                if finished[0]:
                    return
                finished[0] = True
                link.pending.pop(rid, None)
                link._count(-1)
                self._sample(target, link, began, rtt, ok, attempt, measured[0])

            try:
                if self.simulate_rtt:
                    await asyncio.sleep(rtt / 1000)
                await link.send(pack({"id": rid}, body))
                header, first = await asyncio.wait_for(queue.get(), self.timeout_s)
            except TimeoutError:
                done(False)
                raise
            except Exception as e:  # the connection broke under the send
                last = f"replica {link.allocation_id} went away ({e})"
                done(False)
                continue
            if header.get("gone"):
                last = f"replica {link.allocation_id} went away before answering"
                done(False)
                continue
            replica_ms = measured[0] = float(header.get("ms") or 0.0)
            if not header.get("ok"):
                done(False)
                if header.get("program"):
                    raise ProgramFailed(str(header.get("error") or "the program failed"))
                last = f"replica {link.allocation_id} failed: {header.get('error')}"
                continue
            link.ms_per_request = 0.8 * link.ms_per_request + 0.2 * replica_ms
            return Answer(link, header, attempt, first, queue, done)
        raise NoReplica(last)

    def _sample(
        self,
        target: Target,
        link: Link,
        began: float,
        rtt: float,
        ok: bool,
        retries: int,
        replica_ms: float,
    ) -> None:
        total = (time.perf_counter() - began) * 1000
        network = total - replica_ms + (0.0 if self.simulate_rtt else rtt)
        link.answered += ok
        self._samples[target.service_id].append(
            _Sample(
                target.region,
                link.allocation_id,
                total,
                replica_ms,
                ok,
                retries,
                ok and network <= target.slo_ms,
            )
        )

    def refuse(self, service_id: str, region: int) -> None:
        """Count a request no replica could take, as an error of the service's."""
        self._samples[service_id].append(_Sample(region, "", 0.0, 0.0, False, 0, False))

    # -- windows --------------------------------------------------------------------

    def window(self) -> list[dict[str, Any]]:
        """What was measured since the last call, as window rows (and start afresh)."""
        now = time.monotonic()
        seconds = max(now - self._window_started, 1e-3)
        self._window_started = now
        samples, self._samples = self._samples, defaultdict(list)
        self._recent = {k: at for k, at in self._recent.items() if now - at < RECENT_S}
        rows: list[dict[str, Any]] = []
        live = {k.service_id for k in self.links.values()}
        for service_id in set(samples) | live | set(self._recent):
            got = samples.get(service_id, [])
            links = self.by_service.get(service_id, [])
            areas = {}
            for link in links:
                link._count(0)
                areas[link.allocation_id], link.area = link.area, 0.0
            queue_mean = sum(areas.values()) / seconds / max(1, len(links))
            queue_max = max((k.inflight for k in links), default=0)
            rows.append(_row(service_id, "service", seconds, got, queue_mean, queue_max))
            for region in sorted({s.region for s in got}):
                mine = [s for s in got if s.region == region]
                rows.append(_row(service_id, f"region:{region}", seconds, mine, 0.0, 0))
            for link in links:
                mine = [s for s in got if s.link == link.allocation_id]
                mean = areas[link.allocation_id] / seconds
                row = _row(
                    service_id, f"replica:{link.allocation_id}", seconds, mine, mean, link.inflight
                )
                rows.append({**row, "relay": self.address})
        return rows


def _row(
    service_id: str,
    scope: str,
    seconds: float,
    samples: list[_Sample],
    queue_mean: float,
    queue_max: int,
) -> dict[str, Any]:
    ok = [s.total_ms for s in samples if s.ok]
    replica = [s.replica_ms for s in samples if s.ok]
    p50 = p95 = p99 = replica_p95 = None
    if ok:
        p50, p95, p99 = (float(v) for v in np.percentile(ok, [50, 95, 99]))
        replica_p95 = float(np.percentile(replica, 95))
    return {
        "service_id": service_id,
        "scope": scope,
        "seconds": seconds,
        "requests": len(samples),
        "errors": sum(not s.ok for s in samples),
        "retries": sum(s.retries for s in samples),
        "within_slo": sum(s.within_slo for s in samples),
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "replica_p95_ms": replica_p95,
        "queue_mean": queue_mean,
        "queue_max": queue_max,
        "relay": None,
    }
