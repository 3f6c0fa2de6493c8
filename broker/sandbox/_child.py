"""The sandboxed process one run lives in: ``python -m broker.sandbox._child SETUP``.

The agent (``broker.sandbox``) starts it ahead of need. It gives up what
a stranger's program must not have: new privileges (``PR_SET_NO_NEW_PRIVS``)
and, where the agent runs as root on Linux, the network (a network namespace
of its own, entered first, while the process has one thread; only a loopback
that is down) and root itself (it becomes an unprivileged user once JAX and
everything a run needs is loaded, since the agent's Python may be where that
user cannot read). Then it says it is ready and waits for one run on stdin.
With the run come its limits (address space, CPU time, open files, file
size), set before the program is read, and a private directory holding the
artifact, inputs and checkpoint. It checks the artifact again
(``broker.portable.checks``), runs it, and writes checkpoints and the result
as array bundles in that directory.

It talks to the agent in JSON lines on its original stdout; the program's own
output (and XLA's) goes to stderr, which the agent keeps the end of. A replica
of a service (``serve`` in the order) compiles once and then answers requests
framed on stdin, each answer framed on stdout (``broker.sandbox.serve``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import sys
import time
from typing import Any, BinaryIO

_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWNET = 0x40000000


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _no_new_privileges() -> None:
    if sys.platform != "linux":
        return
    if _libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def _leave_network() -> None:
    """A network namespace of its own: no interface but a loopback that is down.
    Done while the process has one thread: a namespace is per thread."""
    if _libc().unshare(_CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")


def _drop_root(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def _set_limits(limits: dict[str, Any]) -> None:
    """Lower this process's limits (never raised: a limit only goes down)."""

    def lower(which: int, value: int | None, grace: int = 0) -> None:
        if value is None:
            return
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value, grace = min(value, hard), min(grace, max(0, hard - value))
        resource.setrlimit(which, (value, value + grace))

    lower(resource.RLIMIT_CORE, 0)
    lower(resource.RLIMIT_AS, limits.get("address_space_bytes"))
    lower(resource.RLIMIT_NOFILE, limits.get("open_files"))
    lower(resource.RLIMIT_FSIZE, limits.get("file_bytes"))
    cpu = limits.get("cpu_seconds")
    if cpu is not None:
        # CPU time counts from the process's start: add what the start-up used.
        used = resource.getrusage(resource.RUSAGE_SELF)
        # SIGXCPU at the soft limit says why; SIGKILL at the hard one, 2 s later, if
        # that signal is caught.
        lower(resource.RLIMIT_CPU, int(used.ru_utime + used.ru_stime + cpu) + 1, grace=2)


def _confine_to(cpus: set[int]) -> None:
    """Run on ``cpus`` only: every thread this process has (XLA's pool started with
    JAX), and so every thread they start. Linux only: elsewhere a share of the CPU is
    held to its memory alone."""
    if not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"):
        return
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


class _Channel:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out

    def send(self, **message: Any) -> None:
        self.out.write((json.dumps(message) + "\n").encode())
        self.out.flush()

    def frame(self, header: dict[str, Any], body: bytes = b"") -> None:
        """A replica's answer (``broker.sandbox.serve``): header length, header, body."""
        head = json.dumps({**header, "size": len(body)}).encode()
        self.out.write(len(head).to_bytes(4, "big") + head)
        self.out.write(body)
        self.out.flush()


def _read_exact(stream: BinaryIO, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _serve(order: dict[str, Any], channel: _Channel) -> None:
    """A replica: compile the program once on the example inputs, then answer the
    requests that come as frames on stdin, one at a time, until stdin closes."""
    from pathlib import Path

    from broker.portable import arrays, checks, runner
    from broker.portable.manifest import ArtifactError

    began = time.perf_counter()
    work = Path(order["dir"])
    try:
        artifact = checks.verify_artifact((work / "artifact.bin").read_bytes())
        checks.check_runnable(artifact, order["platform"], order.get("max_output_bytes"))
        data = (work / "inputs.bin").read_bytes()
        checks.check_inputs(artifact, arrays.read_header(data[: arrays.MAX_HEAD], len(data)))
        call = runner.serve(artifact, arrays.decode(data))
    except (ArtifactError, arrays.BundleError, runner.RunError) as e:
        channel.send(refused=str(e))
        return
    except Exception as e:  # compiling or the first call failed: the program's
        channel.send(error=f"{type(e).__name__}: {e}"[:4000], program=True)
        return
    channel.send(serving=True, compile_seconds=time.perf_counter() - began)
    limit = int(order.get("max_output_bytes") or 1 << 30)
    requests = sys.stdin.buffer
    while (head := _read_exact(requests, 4)) is not None:
        header = json.loads(_read_exact(requests, int.from_bytes(head, "big")) or b"{}")
        body = _read_exact(requests, int(header.get("size", 0))) or b""
        began = time.perf_counter()
        try:
            checks.check_inputs(artifact, arrays.read_header(body[: arrays.MAX_HEAD], len(body)))
            result = arrays.encode(call(arrays.decode(body)))
            if len(result) > limit:
                raise runner.RunError(f"the result is over this provider's {limit}-byte limit")
        except (ArtifactError, arrays.BundleError, runner.RunError) as e:
            channel.frame({"id": header.get("id"), "ok": False, "error": str(e), "program": True})
            continue
        except Exception as e:  # an XLA runtime error: the program's, on these inputs
            text = f"{type(e).__name__}: {e}"[:4000]
            channel.frame({"id": header.get("id"), "ok": False, "error": text, "program": True})
            continue
        ms = (time.perf_counter() - began) * 1000
        channel.frame({"id": header.get("id"), "ok": True, "ms": ms}, result)


def _run(order: dict[str, Any], channel: _Channel) -> None:
    from pathlib import Path

    import numpy as np

    from broker.portable import arrays, checks, runner
    from broker.portable.manifest import ArtifactError

    began = time.perf_counter()
    work = Path(order["dir"])
    if order.get("cache_dir"):
        runner.enable_compilation_cache(Path(order["cache_dir"]))
    try:
        artifact = checks.verify_artifact((work / "artifact.bin").read_bytes())
        checks.check_runnable(artifact, order["platform"], order.get("max_output_bytes"))
        data = (work / "inputs.bin").read_bytes()
        checks.check_inputs(artifact, arrays.read_header(data[: arrays.MAX_HEAD], len(data)))
        inputs = arrays.decode(data)
        checkpoint = None
        if order.get("checkpoint_step"):
            state = arrays.decode((work / "checkpoint.bin").read_bytes())
            checkpoint = runner.Checkpoint(order["checkpoint_step"], state)
    except (ArtifactError, arrays.BundleError) as e:
        channel.send(refused=str(e))
        return
    checked = time.perf_counter()

    def on_checkpoint(step: int, state: list[np.ndarray[Any, Any]]) -> None:
        name = f"checkpoint-{step}.bin"
        arrays.write(work / name, state)
        channel.send(checkpoint=step, file=name)

    def on_progress(step: int) -> None:
        channel.send(progress=step)

    try:
        result = runner.run(
            artifact,
            inputs,
            steps=order.get("steps"),
            checkpoint_every=order.get("checkpoint_every"),
            checkpoint=checkpoint,
            on_checkpoint=on_checkpoint,
            on_progress=on_progress,
        )
    except (runner.RunError, ArtifactError, arrays.BundleError) as e:
        channel.send(error=str(e), program=True)
        return
    except MemoryError:
        channel.send(error="the program ran out of memory (MemoryError)", program=True)
        return
    except Exception as e:  # an XLA runtime error: perhaps the machine's, perhaps the program's
        text = f"{type(e).__name__}: {e}"[:4000]
        exhausted = "RESOURCE_EXHAUSTED" in text or "Out of memory" in text
        channel.send(error=text, program=exhausted)
        return
    arrays.write(work / "result.bin", result.outputs)
    channel.send(
        done="result.bin",
        steps_done=result.steps_done,
        check_seconds=checked - began,
        compile_seconds=result.timings.compile,
        run_seconds=result.timings.run,
        total_seconds=time.perf_counter() - began,
    )


def _warm_up(platform: str) -> None:
    """Package, check and run two tiny programs (a function and an iterative step):
    every module a run needs is then loaded while this process may still read
    the agent's files, and the first run starts sooner."""
    import jax.numpy as jnp
    import numpy as np

    from broker.portable import _xla, arrays, checks, runner
    from broker.portable.artifact import package, package_step

    x = np.eye(2, dtype=np.float32)
    function = checks.verify_artifact(package(lambda a: a @ a, x, platforms=(platform,)).to_bytes())
    arrays.decode(arrays.encode(runner.run(function, [x]).outputs))
    step = package_step(lambda s, a: (s[0] @ a, s[1] + 1), (x, jnp.int32(0)), x)
    step = checks.verify_artifact(step.to_bytes())
    runner.run(
        step, [x, np.int32(0), x], steps=2, checkpoint_every=1, on_checkpoint=lambda *_: None
    )
    if platform == "cpu":
        _xla.initialize_cpu_routines()


def _end_with(parent: int) -> None:
    """Exit when the agent that started this process is gone (killed, say): nobody
    would stop the run at its limits any more."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(70)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def main() -> None:
    setup = json.loads(sys.argv[1])
    parent = os.getppid()
    # The messages keep the real stdout; anything the program or XLA prints goes to stderr.
    channel = _Channel(os.fdopen(os.dup(1), "wb"))
    os.dup2(2, 1)
    if setup.get("network_namespace"):
        _leave_network()  # first: while this process has one thread
    _no_new_privileges()
    began = time.perf_counter()
    import jax

    from broker.portable import _xla

    platform = _xla.local_platform()
    jax.devices()
    _warm_up(platform)
    if setup.get("uid") is not None:
        _drop_root(int(setup["uid"]), int(setup["gid"]))
    _end_with(parent)
    channel.send(ready=True, platform=platform, start_seconds=time.perf_counter() - began)
    line = sys.stdin.readline()
    if not line:
        return  # a spare the agent no longer needs
    order = json.loads(line)
    _set_limits(order.get("limits", {}))
    if order.get("cpus"):
        _confine_to(set(order["cpus"]))
    (_serve if order.get("serve") else _run)(order, channel)


if __name__ == "__main__":
    main()
