"""Hostile programs in the sandbox: each ends in its own child process with its cause,
or is refused there before it runs, while a well-behaved run on the same sandbox
finishes with the right result. No network, no GPU: the CPU backend."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from broker.portable import arrays
from broker.portable.artifact import Artifact, package, package_step
from broker.sandbox import (
    Limits,
    Outcome,
    Placement,
    Sandbox,
    SandboxConfig,
    can_isolate,
    limits_for,
    read_output,
)
from tests.broker.portable.test_hostile import getrf_declaring_a_1x1_result


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox(SandboxConfig(margin_seconds=1.0, max_output_bytes=1024 * 1024))
    yield box
    box.close()


def _limits(**changes: Any) -> Limits:
    base: dict[str, Any] = {
        "wall_seconds": 120.0,
        "wall_cause": "the test's limit",
        "wall_retry": False,
        "cpu_seconds": 240,
        "address_space_bytes": None,
        "open_files": 256,
        "file_bytes": 2 * 1024 * 1024,
    }
    base.update(changes)
    return Limits(**base)


def run(
    box: Sandbox,
    artifact: Artifact | bytes,
    inputs: list[Any],
    limits: Limits | None = None,
    *,
    steps: int | None = None,
    checkpoint_every: int | None = None,
    stop: threading.Event | None = None,
    placement: Placement | None = None,
) -> tuple[Outcome, list[np.ndarray[Any, Any]] | None, list[int]]:
    """Run in ``box`` as an agent does; the outcome, the outputs and the checkpoints' steps."""
    data = artifact if isinstance(artifact, bytes) else artifact.to_bytes()
    workdir = Path(tempfile.mkdtemp(prefix="broker-test-run-"))
    saved: list[int] = []
    try:
        (workdir / "artifact.bin").write_bytes(data)
        (workdir / "inputs.bin").write_bytes(arrays.encode(inputs))
        spec = {
            "platform": "cpu",
            "steps": steps,
            "checkpoint_every": checkpoint_every,
            "checkpoint_step": 0,
        }
        outcome = box.run(
            spec,
            workdir,
            limits or _limits(),
            should_stop=(stop or threading.Event()).is_set,
            on_progress=lambda step: None,
            on_checkpoint=lambda step, path: saved.append(step),
            placement=placement,
        )
        outputs = None
        if outcome.result is not None:
            outputs = [np.array(x) for x in arrays.decode(outcome.result.read_bytes())]
        return outcome, outputs, saved
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def forever(x: jax.Array) -> jax.Array:
    # Counts up in twos from 0: wraps around through the even numbers, never -1.
    return jax.lax.while_loop(lambda c: c[0] != -1, lambda c: c + 2, x)


def hog(x: jax.Array) -> jax.Array:
    # 8 GiB that XLA must hold at once (a sort cannot be fused away).
    big = jnp.arange(2 * 1024**3, dtype=jnp.float32) * x[0]
    return jnp.sort(big)[:4]


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.tanh(a @ b)


def test_a_well_behaved_run_finishes_beside_hostile_ones(sandbox: Sandbox) -> None:
    a = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    good = package(matmul, a, a)
    results: dict[int, Any] = {}

    def good_runs() -> None:
        for i in range(3):
            results[i] = run(sandbox, good, [a, a])

    beside = threading.Thread(target=good_runs)
    beside.start()
    # An infinite loop: stopped at its wall-time limit, with the cause.
    started = time.monotonic()
    looped, _, _ = run(
        sandbox,
        package(forever, jnp.zeros(1, jnp.int32)),
        [np.zeros(1, np.int32)],
        _limits(wall_seconds=2.0, wall_cause="the job's deadline (0.001 h)"),
    )
    assert time.monotonic() - started < 30
    assert looped.kind == "failed"
    assert "passed the job's deadline (0.001 h)" in looped.message
    assert not looped.retry  # the developer's failure
    # Far more memory than declared: ends in its sandbox, with the limit in the reason.
    hogged, _, _ = run(
        sandbox,
        package(hog, jnp.ones(1)),
        [np.ones(1, np.float32)],
        _limits(address_space_bytes=int(4.5 * 1024**3)),
    )
    assert hogged.kind == "failed"
    assert not hogged.retry
    assert "RESOURCE_EXHAUSTED" in hogged.message or "memory" in hogged.message, hogged.message
    beside.join(timeout=120)
    for i in range(3):
        outcome, outputs, _ = results[i]
        assert outcome.kind == "succeeded", outcome.message
        assert outputs is not None
        np.testing.assert_allclose(outputs[0], np.tanh(a @ a), rtol=1e-5, atol=1e-5)


def test_a_mismatched_native_call_is_refused_on_the_agent(sandbox: Sandbox) -> None:
    """The artifact that corrupted the agent's heap: the child re-checks it and refuses."""
    outcome, _, _ = run(sandbox, getrf_declaring_a_1x1_result(), [np.ones((256, 256), np.float32)])
    assert outcome.kind == "refused"
    assert "lapack_sgetrf_ffi" in outcome.message
    assert "against its contract" in outcome.message


def test_a_huge_output_is_refused_before_it_runs(sandbox: Sandbox) -> None:
    huge = package(lambda x: jnp.broadcast_to(x, (4096, 4096)), jnp.ones(4096))
    outcome, _, _ = run(sandbox, huge, [np.ones(4096, np.float32)])
    assert outcome.kind == "refused"
    assert "over the 1048576 bytes" in outcome.message


def test_a_cpu_time_limit_kills_the_child_with_its_cause(sandbox: Sandbox) -> None:
    outcome, _, _ = run(
        sandbox,
        package(forever, jnp.zeros(1, jnp.int32)),
        [np.zeros(1, np.int32)],
        _limits(cpu_seconds=2),
    )
    assert outcome.kind == "failed"
    assert "SIGXCPU" in outcome.message
    assert "CPU time limit (2 s)" in outcome.message


def test_stopping_kills_a_single_call_run_within_seconds(sandbox: Sandbox) -> None:
    stop = threading.Event()
    timer = threading.Timer(1.5, stop.set)
    timer.start()
    started = time.monotonic()
    outcome, _, _ = run(
        sandbox, package(forever, jnp.zeros(1, jnp.int32)), [np.zeros(1, np.int32)], stop=stop
    )
    assert outcome.kind == "stopped"
    assert time.monotonic() - started < 10


def test_an_iterative_run_checkpoints_and_finishes(sandbox: Sandbox) -> None:
    def step(state: tuple[Any, Any], m: Any) -> tuple[Any, Any]:
        w, count = state
        return jnp.tanh(w @ m), count + 1

    w = np.eye(8, dtype=np.float32)
    m = (np.eye(8) * 0.9).astype(np.float32)
    artifact = package_step(step, (w, np.int32(0)), m)
    outcome, outputs, saved = run(
        sandbox, artifact, [w, np.int32(0), m], steps=12, checkpoint_every=4
    )
    assert outcome.kind == "succeeded", outcome.message
    assert outputs is not None
    assert saved == [4, 8]
    assert int(outputs[1]) == 12


def test_waiting_for_the_spare_keeps_it_warm_for_the_next_run() -> None:
    box = Sandbox(SandboxConfig(), spare=True)
    try:
        assert box.wait_spare(timeout=60)
        spare = box._spare
        assert spare is not None
        assert spare.ready is not None  # it loaded JAX and is still the spare
        started = time.monotonic()
        assert box.wait_spare(timeout=0.01)  # already ready: no wait
        assert time.monotonic() - started < 1
        assert box._spare is spare
    finally:
        box.close()
    assert not Sandbox(SandboxConfig(), spare=False).wait_spare(timeout=0.01)


def test_the_start_up_probe_times_a_warm_run_as_the_agent_sees_it() -> None:
    from broker.agent.probe import REQUESTS_PER_RUN, measure_startup

    trips: list[float] = []

    def trip() -> None:
        time.sleep(0.05)
        trips.append(0.05)

    box = Sandbox(SandboxConfig(), spare=True)
    try:
        measured = measure_startup(box, "cpu", trip)
    finally:
        box.close()
    assert len(trips) == 1
    # A warm child still loads, compiles and runs the program: more than the round
    # trips alone; far less than importing JAX again.
    seconds = measured.startup_seconds
    assert REQUESTS_PER_RUN * 0.05 < seconds < REQUESTS_PER_RUN * 0.05 + 30
    # Moving 64 MB in and out costs something, and a GB well under ten minutes.
    assert 0 < measured.transfer_s_per_gb < 600
    # A larger program takes longer to compile and run a first time than the tiny one.
    assert 0 < measured.compile_s_per_kb < 5


def test_the_child_has_no_network_and_no_root() -> None:
    """Where the agent runs as root on Linux, runs get a network namespace of their own
    and an unprivileged user; elsewhere (or without root) this is skipped."""
    if not can_isolate():
        pytest.skip("isolation needs an agent running as root on Linux")
    box = Sandbox(SandboxConfig(), spare=False)
    child = box._take()
    try:
        assert child.wait_ready(120)
        pid = child.process.pid
        status = Path(f"/proc/{pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1] != "0"
        assert "NoNewPrivs:\t1" in status
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    finally:
        child.close()
        box.close()


def test_limits_follow_the_allocation() -> None:
    config = SandboxConfig(margin_seconds=60, runtime_gib=3.0, max_run_hours=24)
    order = {
        "deadline_hours": 2.0,
        "available_hours": 1.0,
        "usage_limit_seconds": 600.0,
        "accelerators": 2,
        "min_memory_gib": 1.5,
        "memory_gib": 64.0,
    }
    limits = limits_for(order, config, "cpu")
    assert limits.wall_seconds == 3600 + 60
    assert limits.wall_retry  # the offer's hours ended: back to the market
    assert "available hours" in limits.wall_cause
    assert limits.cpu_seconds == int((300 + 60) * (os.cpu_count() or 1)) + 1
    assert limits.address_space_bytes == int((1.5 * 2 + 3.0) * 1024**3)
    bare = limits_for({"accelerators": 1}, config, "cuda")
    assert bare.wall_seconds == 24 * 3600 + 60
    assert bare.address_space_bytes is None  # device memory bounds GPU runs
    deadline = limits_for({"deadline_hours": 0.5, "accelerators": 1}, config, "cpu")
    assert not deadline.wall_retry
    assert "deadline" in deadline.wall_cause
    # A share of the CPU: its slice's memory, whatever the offer's accelerator has.
    half = {"accelerators": 1, "memory_gib": 64.0, "slice_memory_gib": 32.0}
    assert limits_for(half, config, "cpu").address_space_bytes == int((32 + 3.0) * 1024**3)
    small = {**half, "min_memory_gib": 4.0}
    assert limits_for(small, config, "cpu").address_space_bytes == int((4 + 3.0) * 1024**3)


def test_the_agent_reads_what_a_child_wrote_without_following_its_links(tmp_path: Path) -> None:
    """A child (broken out of JAX) could leave a link to a file only the agent may read
    where its result belongs; the agent refuses it instead of uploading that file."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"the agent's own file")
    (tmp_path / "result.bin").symlink_to(secret)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        read_output(tmp_path / "result.bin", 1024)
    (tmp_path / "big.bin").write_bytes(b"x" * 2048)
    with pytest.raises(OSError, match="at most 1024 bytes"):
        read_output(tmp_path / "big.bin", 1024)
    (tmp_path / "ok.bin").write_bytes(b"bundle")
    assert read_output(tmp_path / "ok.bin", 1024) == b"bundle"


def test_a_child_that_stops_talking_is_still_stopped_at_its_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child that says it is ready, then closes its channel and runs on (what a
    program broken out of JAX could do), is killed at the wall-time limit all the same."""
    import sys

    import broker.sandbox as module

    script = (
        "import json, os, sys, time; "
        "sys.stdout.write(json.dumps({'ready': True}) + '\\n'); sys.stdout.flush(); "
        "sys.stdin.readline(); os.close(1); time.sleep(600)"
    )
    box = Sandbox(SandboxConfig(margin_seconds=0.5), spare=False)
    monkeypatch.setattr(
        box, "_start", lambda: module._Child([sys.executable, "-c", script], dict(os.environ))
    )
    started = time.monotonic()
    outcome, _, _ = run(box, b"not an artifact", [np.zeros(1)], _limits(wall_seconds=1.5))
    assert time.monotonic() - started < 15
    assert outcome.kind == "failed"
    assert "passed the test's limit" in outcome.message
    box.close()


def test_children_end_when_their_agent_is_killed(tmp_path: Path) -> None:
    """An agent killed outright (SIGKILL) cannot stop its runs any more: a child in
    the middle of an endless program ends itself."""
    import signal
    import subprocess
    import sys

    pids = tmp_path / "pids"
    script = f"""
import numpy as np, jax.numpy as jnp
from pathlib import Path
from broker.sandbox import Sandbox, SandboxConfig
from broker.portable.artifact import package
from tests.broker.agent.test_sandbox import forever, run
box = Sandbox(SandboxConfig(), spare=False)
take = box._take
def taken(placement=None):
    child = take(placement)
    Path({str(pids)!r}).write_text(str(child.process.pid))
    return child
box._take = taken
run(box, package(forever, jnp.zeros(1, jnp.int32)), [np.zeros(1, np.int32)])
"""
    agent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not pids.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        pid = int(pids.read_text())
        time.sleep(3)  # well into the program
        os.kill(pid, 0)  # running
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the child outlived its agent by 10 s")


def test_isolation_is_left_out_where_it_cannot_be_had() -> None:
    """Auto mode runs without isolation, and says so, where it is not to be had; asked
    for outright, it refuses to start instead."""
    if not can_isolate():
        with pytest.raises(RuntimeError, match="root on Linux"):
            Sandbox(SandboxConfig(isolate=True), spare=False)
        assert not Sandbox(SandboxConfig(), spare=False).isolate
        return
    missing = SandboxConfig(user="no-such-user-here")
    assert not Sandbox(missing, spare=False).isolate
    with pytest.raises(RuntimeError, match="no user 'no-such-user-here'"):
        Sandbox(SandboxConfig(isolate=True, user="no-such-user-here"), spare=False)


def test_a_run_on_part_of_the_machine_is_held_to_it(sandbox: Sandbox) -> None:
    """A placement's environment reaches a child of its own (set before JAX starts),
    and every thread of it runs on the placement's cores only."""
    cpu = min(os.sched_getaffinity(0))
    placement = Placement(env={"BROKER_TEST_PLACED": "yes"}, cpus=(cpu,))
    children: list[Any] = []
    take = sandbox._take

    def taken(p: Placement | None = None) -> Any:
        child = take(p)
        children.append(child)
        return child

    stop = threading.Event()
    sandbox._take = taken  # type: ignore[method-assign,assignment]
    try:
        ran = threading.Thread(
            target=run,
            args=(sandbox, package(forever, jnp.zeros(1, jnp.int32)), [np.zeros(1, np.int32)]),
            kwargs={"stop": stop, "placement": placement},
        )
        ran.start()
        deadline = time.monotonic() + 60
        while not children and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = children[0].process.pid
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"BROKER_TEST_PLACED=yes" in environ

        def confined() -> bool:
            tasks = Path(f"/proc/{pid}/task").iterdir()
            return all(os.sched_getaffinity(int(t.name)) == {cpu} for t in tasks)

        while not confined() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert confined()
    finally:
        stop.set()
        ran.join(timeout=60)
        sandbox._take = take  # type: ignore[method-assign]
