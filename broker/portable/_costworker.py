"""XLA's cost analysis of a packaged program in a worker process, beside the export.

The cost analysis converts StableHLO to HLO first (``_cost.hlo_cost``): 7 to 8 ms
for a small program, 5 ms of it a fixed cost, all of it holding the GIL, so in
a thread it overlaps only the export's serialization. A worker process runs it
on another core while the export runs (PyTorch Inductor compiles in a pool of
worker processes for the same reason).

The worker is ``python -m broker.portable._costworker`` (started, not forked:
JAX's threads make fork unsafe). It reads frames (u32 length, MLIR bytecode)
from its stdin and answers each with a frame of JSON, ``{"flops", "bytes"}``
or ``{"error"}``; its first frame says it is ready. It exits at the end of its
stdin, so it ends with its parent however that ends; a parent that stops it, or
exits, kills it.

A process starts it in the background after its second ``package()`` (or with
``start()``); packaging uses it only when it is ready and idle. Otherwise, and
when the worker fails, the analysis runs in this process as it did before, with
the same result; a worker that died is started again, at most ``_MAX_STARTS``
times. ``BROKER_PACKAGE_WORKER=0`` turns it off.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_READY_TIMEOUT_S = 120.0  # a fresh process imports JAX: seconds on a loaded machine
_REPLY_TIMEOUT_S = 600.0  # only a hung worker waits this long: a slow one is as slow here
_MAX_STARTS = 3
_HEADER = struct.Struct("<I")


class _Worker:
    """One worker process. Whoever holds ``busy`` owns its pipes: ``launch()`` while
    it starts, then one request at a time. A worker that failed is ``dead``, and
    the holder of ``busy`` closes its pipes and reaps it on ``release()``."""

    def __init__(self) -> None:
        self.settled = threading.Event()  # set once ready, or failed to start
        self.ready = False
        self.dead = False
        self.busy = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self._guard = threading.Lock()  # orders ``dead`` with taking and releasing ``busy``

    def launch(self) -> None:
        global _off
        self.busy.acquire()
        try:
            if not _enabled():
                _off = True
                self.kill()
                return
            root = str(Path(__file__).resolve().parents[2])  # where ``broker`` imports from
            path = os.environ.get("PYTHONPATH")
            env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
            if path:
                env["PYTHONPATH"] = root + os.pathsep + path
            with self._guard:  # so that kill() comes before, or finds the process
                if self.dead:  # stopped before it started
                    return
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "broker.portable._costworker"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    bufsize=0,  # written and read through their file descriptors
                    env=env,
                )
            if self.receive(_READY_TIMEOUT_S) != {"ready": True}:
                raise OSError("the cost worker did not say it was ready")
            with self._guard:
                self.ready = not self.dead
        except Exception:
            self.kill()
        finally:
            self.release()
            self.settled.set()

    def send(self, bytecode: bytes) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        fd = self.proc.stdin.fileno()
        _write_all(fd, _HEADER.pack(len(bytecode)))
        _write_all(fd, bytecode)

    def receive(self, timeout: float) -> Any:
        assert self.proc is not None
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
        return json.loads(_read_exact(fd, size, deadline))

    def kill(self) -> None:
        """Mark it dead and kill it; the holder of ``busy`` reaps it on ``release()``."""
        with self._guard:
            self.dead = True
            self.ready = False
            if self.proc is not None:
                self.proc.kill()

    def release(self) -> None:
        """Give ``busy`` back, reaping the worker if it is dead."""
        with self._guard:
            if self.dead and self.proc is not None:
                self.proc.wait()  # kill() killed it
                for pipe in (self.proc.stdin, self.proc.stdout):
                    if pipe is not None:
                        pipe.close()
            self.busy.release()

    def close(self) -> None:
        """Kill it (it keeps nothing worth a graceful end) and reap it, or leave the
        reaping to a request under way, which then takes its fallback."""
        self.kill()
        if self.busy.acquire(blocking=False):
            self.release()


class Request:
    """A cost analysis sent to the worker, read back by ``result()``; if the worker
    fails or answers an error, ``fallback()`` (the analysis in this process) gives
    the result, or raises what the analysis raises."""

    def __init__(self, worker: _Worker, bytecode: bytes, fallback: Callable[[], Any]) -> None:
        self._worker = worker
        self._bytecode = bytecode
        self._fallback = fallback
        self._reply: Any = None
        self._sent = self._done = False

    def start(self) -> None:
        with _killed_on_failure(self._worker):
            self._worker.send(self._bytecode)
            self._sent = True

    def wait(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            if self._sent:
                with _killed_on_failure(self._worker):
                    self._reply = self._worker.receive(_REPLY_TIMEOUT_S)
        finally:
            self._worker.release()

    def result(self) -> Any:
        self.wait()
        reply = self._reply
        if not isinstance(reply, dict) or set(reply) != {"flops", "bytes"}:
            return self._fallback()  # also for an {"error"} reply: raised here
        return {"flops": float(reply["flops"]), "bytes": float(reply["bytes"])}


@contextmanager
def _killed_on_failure(worker: _Worker) -> Iterator[None]:
    """A failed exchange kills the worker (its pipes may be mid-frame); an error is
    left to the fallback, anything else (KeyboardInterrupt) goes on."""
    try:
        yield
    except Exception:
        worker.kill()
    except BaseException:
        worker.kill()
        raise


_lock = threading.Lock()  # guards the three below
_current: _Worker | None = None
_starts = 0
_packaged_here = 0  # programs packaged without the worker
_off = False  # set by stop(), or when the setting turns the worker off


def submit(bytecode: bytes, fallback: Callable[[], Any]) -> Request | None:
    """A request to the worker if it is ready and idle (``start()`` it, read its
    ``result()``), else None: run the analysis here."""
    worker = _current
    if worker is None or not worker.ready or not worker.busy.acquire(blocking=False):
        return None
    if not worker.ready:  # died meanwhile
        worker.release()
        return None
    return Request(worker, bytecode, fallback)


def start_soon() -> None:
    """After this process's second program packaged without the worker: start it in
    the background unless it runs, is starting or is off. (A process that packages
    one program, a single ``Client.submit``, never pays for a worker.)"""
    global _packaged_here
    _packaged_here += 1
    worker = _current
    if _packaged_here < 2:
        return
    if _off or (worker is not None and not worker.dead) or _starts >= _MAX_STARTS:
        return
    with _lock:
        _start_locked()


def start(wait: bool = True, timeout: float = _READY_TIMEOUT_S) -> bool:
    """Start the worker (again, after ``stop()``) unless the setting turns it off;
    with ``wait``, wait until it is ready. Whether it is ready."""
    global _off, _starts
    with _lock:
        _off = False
        _starts = 0
        worker = _start_locked()
    if worker is None:
        return False
    if wait:
        worker.settled.wait(timeout)
    return worker.ready


def stop() -> None:
    """Stop the worker; packaging runs the analysis in this process until ``start()``."""
    global _off
    with _lock:
        _off = True
        worker = _current
    if worker is not None:
        worker.close()


def _start_locked() -> _Worker | None:
    global _current, _starts
    if _off:
        return None
    if _current is not None and not _current.dead:
        return _current
    if _starts >= _MAX_STARTS:
        return None
    _starts += 1
    _current = _Worker()
    threading.Thread(target=_current.launch, name="broker-cost-worker", daemon=True).start()
    return _current


def _enabled() -> bool:
    if not hasattr(select, "poll"):  # replies are awaited with poll(): POSIX only
        return False
    try:
        from broker.config import get_settings

        return get_settings().package_worker
    except Exception:  # settings that do not validate: packaging works all the same
        return False


def _close_at_exit() -> None:
    worker = _current
    if worker is not None:
        worker.close()


def _forget_in_child() -> None:
    """A forked child must not talk to its parent's worker: it closes its copies of
    the pipes (so that the worker still ends with the parent) and may start its own."""
    global _lock, _current, _starts
    worker = _current
    if worker is not None and worker.proc is not None:
        for pipe in (worker.proc.stdin, worker.proc.stdout):
            if pipe is not None:
                pipe.close()
    _lock, _current, _starts = threading.Lock(), None, 0


atexit.register(_close_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, size: int, deadline: float) -> bytes:
    chunks, left = [], size
    poll = select.poll()  # not select(): it fails on descriptors past 1024
    poll.register(fd, select.POLLIN)
    while left:
        if not poll.poll(max(0.0, deadline - time.monotonic()) * 1000):
            raise TimeoutError("the cost worker did not answer in time")
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the cost worker ended")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def main() -> None:
    """The worker: answer cost analyses until the end of stdin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the parent
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything else printed goes to stderr, not into the replies
    requests = sys.stdin.buffer
    import jax
    from jax.interpreters import mlir

    from broker.portable._cost import cpu_backend, hlo_cost

    backend = cpu_backend()
    # The first conversion sets up what later ones reuse: done before ready.
    warm_up = jax.jit(lambda x: x + 1).lower(jax.ShapeDtypeStruct((8,), "float32"))
    module = warm_up.compiler_ir("stablehlo")
    assert module is not None
    hlo_cost(mlir.module_to_bytecode(module), backend)
    try:
        _reply(replies, {"ready": True})
        while len(header := requests.read(_HEADER.size)) == _HEADER.size:
            (size,) = _HEADER.unpack(header)
            bytecode = requests.read(size)
            if len(bytecode) < size:
                break
            try:
                answer: dict[str, Any] = hlo_cost(bytecode, backend)
            except Exception as e:  # the parent runs it again, and raises it
                answer = {"error": f"{type(e).__name__}: {e}"}
            _reply(replies, answer)
    except BrokenPipeError:  # the parent is gone
        pass


def _reply(out: IO[bytes], message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    out.write(_HEADER.pack(len(data)) + data)
    out.flush()


if __name__ == "__main__":
    main()
