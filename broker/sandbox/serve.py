"""A service's replica in the sandbox: one child, compiled once, answering requests.

``start`` hands the child a work order with ``serve`` set; the child checks the
program and example inputs as a run's child does, compiles, runs the example
once, says ``serving`` and then answers requests, one at a time, framed on its
stdin and stdout (a 4-byte header length, a JSON header with the body's
``size``, the body). The limits are a run's, the same isolation too: the child
has no network, which is why the agent relays its requests (broker.agent.serving).
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.sandbox import Limits, Outcome, Placement, Sandbox, _Child

Reply = Callable[[dict[str, Any], bytes], None]


class Replica:
    """A serving child; ``submit`` queues a request, ``reply`` gets each answer in turn."""

    def __init__(self, child: _Child, reply: Reply, compile_seconds: float) -> None:
        self.child = child
        self.compile_seconds = compile_seconds
        self._reply = reply
        self._queue: queue.Queue[tuple[dict[str, Any], bytes] | None] = queue.Queue()
        self.error: str | None = None  # why it stopped answering
        self._worker = threading.Thread(target=self._work, name="replica", daemon=True)
        self._worker.start()

    def submit(self, header: dict[str, Any], body: bytes) -> None:
        self._queue.put((header, body))

    def alive(self) -> bool:
        return self.error is None and self.child.process.poll() is None

    def _work(self) -> None:
        stdin, stdout = self.child.process.stdin, self.child.process.stdout
        assert stdin is not None
        assert stdout is not None
        while (item := self._queue.get()) is not None:
            header, body = item
            try:
                head = json.dumps({"id": header.get("id"), "size": len(body)}).encode()
                stdin.write(len(head).to_bytes(4, "big") + head + body)
                stdin.flush()
                answer = _read_frame(stdout)
            except OSError as e:
                answer = None
                self.error = f"the replica's process went away: {e}"
            if answer is None:
                self.error = self.error or "the replica's process ended"
                self._reply({"id": header.get("id"), "ok": False, "error": self.error}, b"")
                break
            self._reply(*answer)
        # Requests still queued get the replica's end as their answer: the relay tries
        # another replica for them.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                error = self.error or "the replica stopped"
                self._reply({"id": item[0].get("id"), "ok": False, "error": error}, b"")

    def close(self) -> None:
        self._queue.put(None)
        self.child.close()
        self._worker.join(timeout=5)

    def stderr_tail(self) -> str:
        return self.child.stderr_tail()


def _read_frame(stream: Any) -> tuple[dict[str, Any], bytes] | None:
    head = stream.read(4)
    if len(head) < 4:
        return None
    header = json.loads(stream.read(int.from_bytes(head, "big")))
    size = int(header.pop("size", 0))
    body = stream.read(size) if size else b""
    if len(body) < size:
        return None
    return header, body


def start(
    sandbox: Sandbox,
    spec: dict[str, Any],
    workdir: Path,
    limits: Limits,
    reply: Reply,
    placement: Placement | None = None,
) -> Replica | Outcome:
    """Start a replica of the program in ``workdir`` (``artifact.bin``, ``inputs.bin``:
    the example); a failed Outcome when it cannot serve (``refused``: the program's)."""
    sandbox.prepare(workdir)
    child = sandbox._take(placement)
    if not child.wait_ready(sandbox.config.start_timeout_s):
        child.close()
        return Outcome("failed", "the sandbox process did not start", retry=True)
    order = {
        **spec,
        "serve": True,
        "dir": str(workdir),
        "limits": limits.for_child(),
        "max_output_bytes": sandbox.config.max_output_bytes,
    }
    if placement is not None and placement.cpus is not None:
        order["cpus"] = list(placement.cpus)
    try:
        child.send(order)
    except OSError as e:
        child.close()
        return Outcome("failed", f"the sandbox process went away: {e}", retry=True)
    try:
        message = child.messages.get(timeout=max(1.0, limits.wall_seconds))
    except queue.Empty:
        message = None
    if message is not None and message.get("serving"):
        # It serves for long: the next run gets a spare of its own, started now that
        # this one has compiled (not beside its compile, where it would take CPU).
        sandbox._refill()
        return Replica(child, reply, float(message.get("compile_seconds") or 0.0))
    child.close()
    sandbox._refill()
    tail = child.stderr_tail()
    if message is not None and "refused" in message:
        return Outcome("refused", str(message["refused"])[:4000], stderr=tail)
    error = (message or {}).get("error") or f"the replica's process ended: {tail or 'no output'}"
    return Outcome("failed", str(error)[:4000], retry=False, stderr=tail)
