"""Each run in a process of its own, with limits: what keeps a provider's machine
safe from the programs it runs.

The agent never runs a developer's program in its own process. ``Sandbox.run``
hands one run to a child (``broker.sandbox._child``) that has given up new
privileges and, where the agent runs as root on Linux, the network and root
itself; it lowers its limits (address space, CPU time, open files, file size)
before it reads the program. The agent watches it: it kills the child when the
job is cancelled or reassigned, when the run passes its wall-time limit (the
job's deadline or the offer's available hours, plus a margin) and when the
agent stops. A child that crashes, aborts, runs out of memory or hits a limit
ends its own run only, and the agent says why.

A child takes about a second to import JAX, so the sandbox keeps one spare
child started ahead of need: a run takes the spare, and a new spare starts when
the run ends (not beside it, where it would take CPU from the run).

A run on part of a machine (``Placement``: a MIG instance, a share of a GPU or
of the CPU) is held to it: the devices it may see and the GPU memory it may take
are set in its child's environment before JAX starts (such a run starts a child
of its own, not the spare, whose JAX has started), and its CPU cores are those
it may run on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pwd
import queue
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GIB = 1024**3
_MAX_MESSAGE = 64 * 1024


def _runtime_gib() -> float:
    # Address space JAX's CPU runtime takes before a program's own arrays: measured
    # at 1.6 GiB on a 2-core machine; its thread pools add stacks per core.
    return 3.0 + 0.125 * (os.cpu_count() or 1)


def can_isolate() -> bool:
    """Whether children can get a network namespace and an unprivileged user: the
    agent runs as root on Linux."""
    return sys.platform == "linux" and os.geteuid() == 0


def _isolation_problem(user: str) -> str | None:
    """Why children cannot be isolated here (None: they can): no such user, or a
    root without the right to make namespaces (some containers)."""
    try:
        pwd.getpwnam(user)
    except KeyError:
        return f"there is no user {user!r} to run them as"
    probe = (
        "import ctypes, sys; sys.exit(ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0)"
    )
    done = subprocess.run(  # noqa: S603  (our own interpreter, no shell)
        [sys.executable, "-c", probe], capture_output=True, timeout=30, check=False
    )
    if done.returncode != 0:
        return "this root may not make network namespaces (a container without CAP_SYS_ADMIN?)"
    return None


@dataclass(frozen=True)
class SandboxConfig:
    """How the agent confines runs. The defaults suit a machine given over to the market."""

    # Memory a run may use, in GiB, when the job declares none: None, what the offer lists
    # for the accelerators it holds.
    memory_gib: float | None = None
    # Added to a run's memory for the address space of the runtime itself (JAX, XLA).
    runtime_gib: float = field(default_factory=_runtime_gib)
    open_files: int = 256
    max_output_bytes: int = GIB  # the largest result or checkpoint a run may write
    max_run_hours: float = 24.0  # a run with no deadline and no available hours ends here
    margin_seconds: float = 60.0  # past a wall-time limit before the run is stopped
    # None: isolate (network namespace, unprivileged user) wherever the agent can.
    isolate: bool | None = None
    user: str = "nobody"
    start_timeout_s: float = 120.0


@dataclass(frozen=True)
class Placement:
    """Where on the machine a run goes, when it holds part of it: variables for its
    child's environment (``CUDA_VISIBLE_DEVICES``, ``XLA_PYTHON_CLIENT_MEM_FRACTION``)
    and the CPU cores it may use (None: any)."""

    env: dict[str, str] = field(default_factory=dict)
    cpus: tuple[int, ...] | None = None
    what: str = ""  # for the run's log: "MIG-... (3g.40gb@4)", "cores 0-1"


@dataclass(frozen=True)
class Limits:
    """One run's limits, from its allocation."""

    wall_seconds: float
    wall_cause: str  # what the wall-time limit is, for the developer
    wall_retry: bool  # past it, the job goes back to the market (the offer's hours ended)
    cpu_seconds: int
    address_space_bytes: int | None
    open_files: int
    file_bytes: int

    def for_child(self) -> dict[str, Any]:
        return {
            "cpu_seconds": self.cpu_seconds,
            "address_space_bytes": self.address_space_bytes,
            "open_files": self.open_files,
            "file_bytes": self.file_bytes,
        }


def limits_for(order: dict[str, Any], config: SandboxConfig, platform: str) -> Limits:
    """A run's limits: wall time from the job's deadline and the offer's available hours
    (whichever is first; else ``max_run_hours``) plus a margin; CPU time for that
    long on every core; address space for the job's declared memory (else the
    offer's) plus the runtime's own, on the CPU only (GPU runtimes map device
    memory into the address space, so there the device bounds the memory)."""
    limits: list[tuple[float, str, bool]] = [
        (config.max_run_hours * 3600, f"this provider's limit of {config.max_run_hours:g} h", False)
    ]
    deadline = order.get("deadline_hours")
    if deadline is not None:
        limits.append((deadline * 3600, f"the job's deadline ({deadline:g} h)", False))
    available = order.get("available_hours")
    if available is not None:
        limits.append((available * 3600, f"the offer's available hours ({available:g} h)", True))
    seconds, cause, retry = min(limits, key=lambda x: x[0])
    wall = seconds + config.margin_seconds
    cpu_wall = wall
    usage = order.get("usage_limit_seconds")
    accelerators = max(1, int(order.get("accelerators") or 1))
    if usage is not None:
        cpu_wall = min(cpu_wall, usage / accelerators + config.margin_seconds)
    address_space = None
    if platform == "cpu":
        declared = float(order.get("min_memory_gib") or 0.0)
        listed = float(order.get("memory_gib") or 0.0)
        memory = declared or config.memory_gib or listed
        if config.memory_gib is not None:
            memory = min(memory, config.memory_gib)
        if order.get("slice_memory_gib"):  # part of the machine: its slice's memory at most
            held = float(order["slice_memory_gib"])
            memory = min(memory, held) if memory > 0 else held
        if memory > 0:
            address_space = int((memory * accelerators + config.runtime_gib) * GIB)
    return Limits(
        wall_seconds=wall,
        wall_cause=cause,
        wall_retry=retry,
        cpu_seconds=int(cpu_wall * (os.cpu_count() or 1)) + 1,
        address_space_bytes=address_space,
        open_files=config.open_files,
        # A bundle's header comes on top of the arrays.
        file_bytes=config.max_output_bytes + 1024 * 1024,
    )


@dataclass
class Outcome:
    """How a sandboxed run ended.

    ``kind``: ``succeeded`` (``result`` is the bundle of outputs), ``refused`` (the
    artifact or inputs failed the checks here; the developer's), ``failed`` (the
    program failed, crashed or passed a limit; ``retry`` when the job should go
    back to the market instead of failing) or ``stopped`` (``should_stop`` said so).
    """

    kind: str
    message: str = ""
    retry: bool = False
    result: Path | None = None
    steps_done: int = 0
    run_seconds: float | None = None  # the child's time running the steps (benchmarks)
    compile_seconds: float | None = None  # the child's time compiling the program
    total_seconds: float | None = None  # the child's, from the work order to the result
    stderr: str = ""  # the end of what the child wrote to its stderr (the run's log)


class _Child:
    """One child process and what it says."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(  # noqa: S603  (our own module, no shell)
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # its own process group: killed as one
            close_fds=True,
        )
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stderr = bytearray()
        self._readers = [
            threading.Thread(target=self._read_messages, daemon=True, name="sandbox-out"),
            threading.Thread(target=self._read_stderr, daemon=True, name="sandbox-err"),
        ]
        for reader in self._readers:
            reader.start()
        self.ready: dict[str, Any] | None = None
        self.killed = False

    def _read_messages(self) -> None:
        assert self.process.stdout is not None
        # Lines are read with a bound: a child that writes a huge line costs nothing.
        while line := self.process.stdout.readline(_MAX_MESSAGE):
            if not line.endswith(b"\n"):
                continue  # too long: not a message of ours
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                self.messages.put(message)
                if "serving" in message:
                    return  # a replica's answers follow, framed (broker.sandbox.serve)
        self.messages.put(None)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        while chunk := os.read(self.process.stderr.fileno(), 65536):
            self._stderr += chunk
            del self._stderr[:-8192]  # the end is what says what went wrong

    def stderr_text(self) -> str:
        """The end of the child's stderr (its last 8 KiB), once it has closed it."""
        for reader in self._readers:
            reader.join(timeout=2)
        return self._stderr.decode(errors="replace").strip()

    def stderr_tail(self) -> str:
        text = self.stderr_text()
        lines = [line for line in text.splitlines() if line.strip()]
        return "\n".join(lines[-6:])[-1500:]

    def wait_ready(self, timeout: float) -> bool:
        if self.ready is not None:
            return True
        try:
            message = self.messages.get(timeout=timeout)
        except queue.Empty:
            return False
        if message is None or not message.get("ready"):
            return False
        self.ready = message
        return True

    def send(self, order: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(order) + "\n").encode())
        self.process.stdin.flush()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def close(self) -> None:
        """Kill it if it still runs, and close its pipes once their readers are done."""
        self.kill()
        for reader in self._readers:
            reader.join(timeout=2)
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def discard(self) -> None:
        """A spare no longer needed: closing its stdin lets it exit; else it is killed."""
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
            self.process.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.close()


ProgressFn = Callable[[int], None]
CheckpointFn = Callable[[int, Path], None]


class Sandbox:
    """Runs each run in a child process of its own; keeps one spare child warm.

    Thread-safe: several runs may go at once, each in its own child.
    """

    def __init__(
        self,
        config: SandboxConfig | None = None,
        cache_dir: Path | None = None,
        *,
        spare: bool = True,
    ) -> None:
        self.config = config or SandboxConfig()
        self.cache_dir = cache_dir
        self.isolate = can_isolate() if self.config.isolate is None else self.config.isolate
        if self.isolate and not can_isolate():
            raise RuntimeError(
                "isolating runs (a network namespace, an unprivileged user) needs an agent "
                "running as root on Linux"
            )
        if self.isolate and (problem := _isolation_problem(self.config.user)):
            if self.config.isolate:  # asked for outright: do not run without it
                raise RuntimeError(f"cannot isolate runs: {problem}")
            log.warning("runs are not isolated (network, user): %s", problem)
            self.isolate = False
        self._uid: tuple[int, int] | None = None
        if self.isolate:
            user = pwd.getpwnam(self.config.user)
            self._uid = (user.pw_uid, user.pw_gid)
        self._keep_spare = spare
        self._lock = threading.Lock()
        self._spare: _Child | None = None
        self._closed = False
        if spare:
            self._refill()

    def _start(self, extra: dict[str, str] | None = None) -> _Child:
        setup: dict[str, Any] = {"network_namespace": self.isolate}
        if self._uid is not None:
            setup["uid"], setup["gid"] = self._uid
        env = {
            k: v
            for k, v in os.environ.items()
            if k in ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "HOME")
            or k.startswith(("JAX_", "XLA_", "TF_CPP_"))
        }
        env["PYTHONUNBUFFERED"] = "1"
        env["BROKER_PACKAGE_WORKER"] = "0"  # its warm-up packages a program: no worker
        if self._uid is not None:
            env["HOME"] = "/nonexistent"
        env.update(extra or {})
        command = [sys.executable, "-m", "broker.sandbox._child", json.dumps(setup)]
        return _Child(command, env)

    def _refill(self) -> None:
        with self._lock:
            if self._keep_spare and self._spare is None and not self._closed:
                self._spare = self._start()

    def _take(self, placement: Placement | None = None) -> _Child:
        if placement is not None and placement.env:
            return self._start(placement.env)  # the spare's JAX has started: a child of its own
        with self._lock:
            child, self._spare = self._spare, None
        if child is None or child.process.poll() is not None:
            child = self._start()
        return child

    def wait_spare(self, timeout: float) -> bool:
        """Wait until the spare child has loaded JAX (as it has between a node's runs);
        False when there is none or it is not ready in ``timeout`` seconds.

        The spare is held aside while it is waited for, so no run reads its messages
        meanwhile (a run that starts then starts a child of its own)."""
        with self._lock:
            child, self._spare = self._spare, None
        if child is None:
            return False
        ready = child.wait_ready(timeout)
        with self._lock:
            if ready and self._spare is None and not self._closed:
                self._spare, child = child, None
        if child is not None:
            child.discard()
            self._refill()
        return ready

    def close(self) -> None:
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.discard()

    def prepare(self, workdir: Path) -> None:
        """Make ``workdir`` (and what is in it) the sandboxed user's, when runs are isolated."""
        if self._uid is None:
            return
        uid, gid = self._uid
        for path in [workdir, *workdir.rglob("*")]:
            os.chown(path, uid, gid)

    def cache_for(self, key: str) -> Path | None:
        """The compilation cache a run of artifact ``key`` may use: one per artifact, so a
        run can only ever leave compiled code for the program it runs.

        Isolated children run as another user, who may not reach the agent's cache
        directory (it is often under root's home): theirs then live in a directory of
        the system's temporary one that anyone may pass through but not list, one
        per artifact, each the sandbox user's alone.
        """
        if self.cache_dir is None:
            return None
        if self._uid is None:
            path = self.cache_dir / "sandbox" / key
            path.mkdir(parents=True, exist_ok=True)
            return path
        digest = hashlib.sha256(str(self.cache_dir.resolve()).encode()).hexdigest()[:16]
        root = Path(tempfile.gettempdir()) / f"broker-sandbox-cache-{digest}"
        root.mkdir(mode=0o711, exist_ok=True)
        if root.stat().st_uid != os.geteuid() or root.is_symlink():
            raise RuntimeError(f"{root} is not this agent's: remove it, or set cache_dir")
        os.chmod(root, 0o711)  # noqa: S103  (pass through, not list: see above)
        path = root / key
        path.mkdir(mode=0o700, exist_ok=True)
        os.chown(path, *self._uid)
        return path

    def run(
        self,
        spec: dict[str, Any],
        workdir: Path,
        limits: Limits,
        *,
        should_stop: Callable[[], bool],
        on_progress: ProgressFn,
        on_checkpoint: CheckpointFn,
        on_tick: Callable[[], None] | None = None,
        tick: float = 0.1,
        placement: Placement | None = None,
    ) -> Outcome:
        """Run ``spec`` (``steps``, ``checkpoint_every``, ``checkpoint_step``, ``platform``,
        ``cache_dir``) from ``workdir`` (``artifact.bin``, ``inputs.bin``, and
        ``checkpoint.bin`` to resume) in a child; returns how it ended.

        ``on_progress`` and ``on_checkpoint`` (a bundle's path in ``workdir``) are
        called as the child reports; ``on_tick`` about every ``tick`` seconds
        besides; ``should_stop`` is asked as often, and the child is killed when
        it says so. ``placement`` holds the run to part of the machine.
        """
        self.prepare(workdir)
        child = self._take(placement)
        if placement is not None and placement.cpus is not None:
            spec = {**spec, "cpus": list(placement.cpus)}
        try:
            outcome = self._watch(
                child, spec, workdir, limits, should_stop, on_progress, on_checkpoint, on_tick, tick
            )
            if child.process.poll() is not None:  # else it lingers: close() kills it first
                outcome.stderr = child.stderr_text()
            return outcome
        finally:
            child.close()
            # The next spare starts once this run is over: starting one (importing JAX)
            # beside a run would take CPU from it.
            self._refill()

    def _watch(
        self,
        child: _Child,
        spec: dict[str, Any],
        workdir: Path,
        limits: Limits,
        should_stop: Callable[[], bool],
        on_progress: ProgressFn,
        on_checkpoint: CheckpointFn,
        on_tick: Callable[[], None] | None,
        tick: float,
    ) -> Outcome:
        if not child.wait_ready(self.config.start_timeout_s):
            child.kill()
            tail = child.stderr_tail()
            return Outcome(
                "failed",
                f"the sandbox process did not start: {tail or 'no output'}"[:4000],
                retry=True,  # the machine's problem, not the program's
            )
        order = {
            **spec,
            "dir": str(workdir),
            "limits": limits.for_child(),
            "max_output_bytes": self.config.max_output_bytes,
        }
        try:
            child.send(order)
        except OSError as e:
            return Outcome("failed", f"the sandbox process went away: {e}", retry=True)
        started = time.monotonic()
        steps = 0
        ended: Outcome | None = None
        closed = False  # the child closed its end: it is exiting (or says no more)
        while True:
            message: dict[str, Any] | None = {}
            if closed:
                time.sleep(tick)
            else:
                with contextlib.suppress(queue.Empty):
                    message = child.messages.get(timeout=tick)
            if message is None:
                closed = True
            elif "progress" in message:
                steps = int(message["progress"])
                on_progress(steps)
            elif "checkpoint" in message:
                step = int(message["checkpoint"])
                on_checkpoint(step, workdir / f"checkpoint-{step}.bin")
            elif "done" in message:
                steps = int(message.get("steps_done", steps))
                ended = Outcome(
                    "succeeded",
                    result=workdir / "result.bin",
                    steps_done=steps,
                    run_seconds=message.get("run_seconds"),
                    compile_seconds=message.get("compile_seconds"),
                    total_seconds=message.get("total_seconds"),
                )
            elif "refused" in message:
                ended = Outcome("refused", str(message["refused"])[:4000])
            elif "error" in message:
                program = bool(message.get("program"))
                ended = Outcome("failed", str(message["error"])[:4000], retry=not program)
            if ended is not None:
                try:  # it exits after its last word; one that lingers is killed
                    child.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
                break
            if closed and child.process.poll() is not None:
                break
            if on_tick is not None:
                on_tick()
            # Both checked until the child is gone, even once it has closed its end.
            if should_stop():
                child.kill()
                return Outcome("stopped", "stopped", steps_done=steps)
            if time.monotonic() - started > limits.wall_seconds:
                child.kill()
                over = limits.wall_seconds - self.config.margin_seconds
                return Outcome(
                    "failed",
                    f"the run was stopped: it passed {limits.wall_cause}, "
                    f"{over:g} s plus a {self.config.margin_seconds:g} s margin",
                    retry=limits.wall_retry,
                    steps_done=steps,
                )
        code = child.process.wait()
        if ended is not None and (code == 0 or ended.kind != "succeeded"):
            return ended
        return Outcome("failed", _death(code, limits, child.stderr_tail()), steps_done=steps)


def _death(code: int, limits: Limits, tail: str) -> str:
    """Why a child ended without saying how its run did."""
    if code >= 0:
        why = f"the program's process exited with status {code}"
    else:
        number = -code
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        why = f"the program's process was killed by {name}"
        if number == signal.SIGXCPU:
            why += f": it used up its CPU time limit ({limits.cpu_seconds} s)"
        elif number == signal.SIGXFSZ:
            why += f": it wrote a file over the {limits.file_bytes}-byte limit"
        elif number in (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGKILL):
            why += " (a crash"
            if limits.address_space_bytes is not None:
                why += (
                    f", or memory over its limit of {limits.address_space_bytes / GIB:.3g} GiB "
                    "of address space"
                )
            why += ")"
    if tail:
        why += f"; its last output: {tail}"
    return why[:4000]


def read_output(path: Path, limit: int) -> bytes:
    """A file a child wrote in its directory, read without following a link it may
    have put there instead (the agent may be root): a regular file of at most
    ``limit`` bytes, else OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            raise OSError(f"{path.name} is not a regular file of at most {limit} bytes")
        return f.read(limit + 1)[:limit]


def remove(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
