"""A replica of an inference service, as the agent runs it (issue: inference endpoints).

The allocation's program runs in a sandboxed child that compiles it once and
answers requests (``broker.sandbox.serve``). The agent holds a WebSocket to the
broker's relay (``/v1/replicas/{allocation}/connect``, with the node's key):
requests come down it and go to the child, one at a time; answers go up it, a
large one in chunks. Meanwhile the agent reports usage as any run does (wall
time times what it holds), and stops when the broker says the allocation ended
(the service was undeployed or scaled down), the agent stops, or the provider's
wall-time limit passes. A connection that breaks is opened again, with backoff;
while it is down the relay sends the service's requests to other replicas.
A child that dies fails the run with its reason; the service opens another.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from broker.portable import _xla
from broker.sandbox import Outcome, Placement, Sandbox, limits_for, remove
from broker.sandbox import serve as replicas
from broker.sdk.frames import CHUNK, pack, unpack
from broker.sdk.provider import ProviderClient, RunHandle, _ended, report_end
from broker.sdk.runlog import RunLog

log = logging.getLogger(__name__)


def relay_url(client: ProviderClient, order: dict[str, Any]) -> str:
    base = str(order.get("relay") or client.http.url).rstrip("/")
    if base.startswith("http"):
        base = "ws" + base[4:]
    return f"{base}/v1/replicas/{order['allocation_id']}/connect"


class _Link:
    """The agent's end of the relay: one WebSocket at a time, sends serialized."""

    def __init__(self, url: str, authorization: str) -> None:
        self.url, self.authorization = url, authorization
        self.socket: ClientConnection | None = None
        self.refused: str | None = None  # the broker will not take this replica
        self._lock = threading.Lock()

    def open(self) -> ClientConnection | None:
        try:
            socket = connect(
                self.url,
                additional_headers={"Authorization": self.authorization},
                max_size=None,
                open_timeout=10,
                compression=None,
            )
        except InvalidStatus as e:
            if 400 <= e.response.status_code < 500 and e.response.status_code != 429:
                self.refused = f"the broker refused the replica's connection ({e})"
            return None
        except (OSError, WebSocketException, TimeoutError) as e:
            log.warning("replica connection to %s failed: %s", self.url, e)
            return None
        self.socket = socket
        return socket

    def send(self, header: dict[str, Any], body: bytes) -> None:
        """An answer, in chunks; dropped when the connection is down (the relay sent
        the request again elsewhere when it closed)."""
        socket = self.socket
        if socket is None:
            return
        chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)] or [b""]
        try:
            with self._lock:
                for i, chunk in enumerate(chunks):
                    socket.send(pack({**header, "more": i < len(chunks) - 1}, chunk))
        except (ConnectionClosed, OSError):
            pass

    def close(self) -> None:
        socket, self.socket = self.socket, None
        if socket is not None:
            socket.close()


def serve_allocation(
    client: ProviderClient,
    order: dict[str, Any],
    *,
    handle: RunHandle,
    sandbox: Sandbox,
    placement: Placement | str | None = None,
    emulate: bool = False,
    progress_seconds: float = 1.0,
) -> str:
    """Serve one replica allocation until it ends (see the module); returns how it
    ended, as ``run_allocation`` does: ``ended``, ``stopped``, or the job's state."""
    allocation = order["allocation_id"]
    order = client.start(allocation)
    if handle.started is None:
        handle.started = time.monotonic()
    run_log = RunLog()

    def finish(outcome: str, **report: Any) -> str:
        job = report_end(client, allocation, handle, run_log, outcome, "the replica", **report)
        return "ended" if job is None else str(job["state"])

    here = _xla.local_platform()
    if order["platform"] != here and not (emulate and order.get("emulated")):
        return finish(
            "failed", error=f"the offer is {order['platform']} but this machine runs {here}"
        )
    if isinstance(placement, str):
        return finish("failed", error=placement, retry=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"broker-replica-{allocation}-"))
    link = _Link(relay_url(client, order), client.http.authorization)
    replica: replicas.Replica | None = None
    try:
        (workdir / "artifact.bin").write_bytes(client.download_artifact(order["artifact"]))
        (workdir / "inputs.bin").write_bytes(client.download_arrays(order["inputs"]))
        cache = sandbox.cache_for(order["artifact"])
        spec = {"platform": here, "cache_dir": None if cache is None else str(cache)}
        limits = limits_for(order, sandbox.config, here)
        started = replicas.start(sandbox, spec, workdir, limits, link.send, placement)
        if isinstance(started, Outcome):
            run_log.write(started.stderr, stream="program")
            why = started.message
            if started.kind == "refused":
                why = f"the agent refused the artifact: {why}"
            return finish("failed", error=why, retry=started.retry)
        replica = started
        run_log.write(f"serving: compiled and warmed up in {replica.compile_seconds:.2f} s")
        return _serve(
            client,
            order,
            handle,
            replica,
            link,
            run_log,
            limits.wall_seconds,
            finish,
            progress_seconds,
        )
    finally:
        link.close()
        if replica is not None:
            replica.close()
        remove(workdir)


def _serve(
    client: ProviderClient,
    order: dict[str, Any],
    handle: RunHandle,
    replica: replicas.Replica,
    link: _Link,
    run_log: RunLog,
    wall_seconds: float,
    finish: Callable[..., str],
    progress_seconds: float,
) -> str:
    allocation = order["allocation_id"]
    began = time.monotonic()
    delay = 0.5
    receiver: threading.Thread | None = None
    while True:
        if receiver is None or not receiver.is_alive():
            if link.refused:
                return _refused(client, allocation, link.refused, finish)
            socket = link.open()
            if socket is not None:
                delay = 0.5
                run_log.write("connected to the broker's relay")
                receiver = threading.Thread(
                    target=_receive, args=(socket, replica), name="replica-in", daemon=True
                )
                receiver.start()
        lines = run_log.pending()

        def send(lines: list[dict[str, Any]] = lines) -> None:
            client.progress(allocation, 0, handle.accelerator_seconds(), log=lines)
            run_log.sent(lines)

        if _ended(send):
            return "ended"
        if handle.stop.is_set():
            handle.ended = time.monotonic()
            return "stopped"
        if not replica.alive():
            tail = replica.stderr_tail()
            return finish("failed", error=f"{replica.error}" + (f"; {tail}" if tail else ""))
        if time.monotonic() - began > wall_seconds:
            return finish(
                "failed", error="the replica passed this provider's time limit", retry=True
            )
        wait = progress_seconds if receiver is not None and receiver.is_alive() else delay
        handle.stop.wait(wait)
        delay = min(delay * 2, 15.0)


def _receive(socket: ClientConnection, replica: replicas.Replica) -> None:
    try:
        for message in socket:
            if isinstance(message, bytes):
                header, body = unpack(message)
                replica.submit(header, bytes(body))
    except (ConnectionClosed, OSError, ValueError) as e:
        log.info("replica connection closed: %s", e)


def _refused(client: ProviderClient, allocation: str, why: str, finish: Callable[..., str]) -> str:
    """The relay refused the connection: the allocation has ended (say so), or it never
    will take it (fail the run, for the market to place the replica again)."""
    if _ended(lambda: client.progress(allocation, 0)):
        return "ended"
    return finish("failed", error=why, retry=True)
