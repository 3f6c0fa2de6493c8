"""The load generator of ``benchmarks.load``: one process that drives a running broker
over HTTP/1.1 keep-alive connections for a fixed time, and reports what it saw.

It reads a plan (JSON) on stdin and writes one JSON object on stdout: the latency
of every request measured, the status codes, and the CPU time this process used,
so the report can show whether the generator kept up. Two ways to drive:

- **closed loop** (``rate`` null): ``concurrency`` clients, each on its own
  connection, sending its next request as soon as the last one answered. Gives
  the most the server does.
- **open loop** (``rate`` requests/s): requests are due on a fixed schedule
  whatever the server does, and go out on the first of ``concurrency``
  connections that is free. A request's latency runs from the moment it was due,
  so a server that falls behind is charged for the queue it builds (no
  coordinated omission); the throughput counts only what finished in the window.

Requests cycle through the plan's ``requests`` and API keys; ``idempotency`` adds
a fresh ``Idempotency-Key`` to each, as the SDK does.

The client is a few lines over asyncio streams rather than httpx: on this 2-core
machine the generator shares the CPU with the server, and httpx spent about ten
times the CPU per request (see docs/benchmarks.md, "Measured: load").
"""

from __future__ import annotations

import asyncio
import itertools
import json
import resource
import sys
import uuid
from collections import Counter
from typing import Any, TypedDict
from urllib.parse import urlsplit


class Request(TypedDict):
    method: str
    path: str
    body: str | None


class Plan(TypedDict):
    base: str
    requests: list[Request]
    keys: list[str]
    concurrency: int
    rate: float | None
    duration: float
    warmup: float
    idempotency: bool
    timeout: float


class Connection:
    """One keep-alive HTTP/1.1 connection; answers are read by Content-Length or chunks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def send(self, raw: bytes) -> int:
        """Send one request; the status code once the whole answer is read."""
        self.writer.write(raw)
        status = int((await self.reader.readuntil(b"\r\n")).split(b" ", 2)[1])
        length, chunked = 0, False
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        if not chunked:
            await self.reader.readexactly(length)
            return status
        while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await self.reader.readexactly(size + 2)
        await self.reader.readuntil(b"\r\n")
        return status

    def close(self) -> None:
        self.writer.close()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _raw_requests(plan: Plan, host: str) -> itertools.cycle[tuple[bytes, bytes]]:
    """Each request as the bytes before and after its per-request headers."""
    raw = []
    for r in plan["requests"]:
        body = (r["body"] or "").encode()
        head = f"{r['method']} {r['path']} HTTP/1.1\r\nHost: {host}\r\n"
        if r["body"] is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        raw.append((head.encode(), b"\r\n" + body))
    return itertools.cycle(raw)


async def drive(plan: Plan) -> dict[str, Any]:
    base = urlsplit(plan["base"])
    host, port = base.hostname or "127.0.0.1", base.port or 80
    requests = _raw_requests(plan, f"{host}:{port}")
    keys = itertools.cycle([f"Authorization: Bearer {k}\r\n".encode() for k in plan["keys"]])
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    finished = 0  # requests that finished inside the window
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    connections = [await Connection.open(host, port) for _ in range(plan["concurrency"])]
    for connection in connections:
        idle.put_nowait(connection)
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from = start + plan["warmup"]
    end = measure_from + plan["duration"]

    async def one(due: float) -> None:
        nonlocal finished
        head, tail = next(requests)
        raw = head + next(keys)
        if plan["idempotency"]:
            raw += b"Idempotency-Key: " + uuid.uuid4().hex.encode() + b"\r\n"
        connection = await idle.get()
        try:
            status = str(await asyncio.wait_for(connection.send(raw + tail), plan["timeout"]))
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            status = type(exc).__name__
            connection.close()
            connection = await Connection.open(host, port)
        idle.put_nowait(connection)
        done = loop.time()
        # Closed loop: what finished inside the window. Open loop: every request
        # due inside it, however late it finished (the queue counts).
        if measure_from <= due < end and (plan["rate"] is not None or done <= end):
            latencies.append(done - due)
            statuses[status] += 1
            finished += done <= end

    cpu_before = _cpu_seconds()
    if plan["rate"] is None:

        async def client() -> None:
            while (now := loop.time()) < end:
                await one(now)

        await asyncio.gather(*(client() for _ in range(plan["concurrency"])))
    else:
        interval = 1.0 / plan["rate"]
        pending: set[asyncio.Task[None]] = set()
        for k in itertools.count():
            due = start + k * interval
            if due >= end:
                break
            if (delay := due - loop.time()) > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(due))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=plan["timeout"])
    cpu = _cpu_seconds() - cpu_before
    for connection in connections:
        connection.close()
    return {
        "latencies": latencies,
        "statuses": dict(statuses),
        "finished": finished,
        "window": plan["duration"],
        "cpu_seconds": cpu,
    }


def main() -> None:
    plan: Plan = json.load(sys.stdin)
    json.dump(asyncio.run(drive(plan)), sys.stdout)


if __name__ == "__main__":
    main()
