"""The cost worker: XLA's cost analysis in a process beside the export, with the
same artifacts as without it, and nothing left running after it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import pytest

from broker.config import get_settings
from broker.portable import _costworker
from broker.portable.artifact import Artifact, package, start_cost_worker, stop_cost_worker
from tests.broker.portable.programs import mlp, mlp_args, sgd_args, sgd_step

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module", autouse=True)
def worker_on() -> Iterator[None]:
    """The worker on (tests/conftest.py turns it off), ready before each test."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BROKER_PACKAGE_WORKER", "1")
        get_settings.cache_clear()
        yield
        stop_cost_worker()
    get_settings.cache_clear()


@pytest.fixture
def worker() -> _costworker._Worker:
    assert start_cost_worker(wait=True)
    assert _costworker._current is not None
    return _costworker._current


def attention(q: Any, k: Any, v: Any) -> Any:
    return jax.nn.softmax(q @ k.T / 16.0) @ v


def branches(x: Any) -> Any:
    return jax.lax.platform_dependent(x, cpu=jnp.sin, default=jnp.cos) @ x


PROGRAMS = [
    pytest.param(mlp, mlp_args(), id="mlp"),
    pytest.param(attention, (jnp.ones((64, 32)),) * 3, id="attention"),
    pytest.param(branches, (jnp.ones((4, 4)),), id="platform-dependent"),
    pytest.param(jnp.linalg.cholesky, (jnp.eye(4),), id="custom-call"),
]


def in_process(fn: Callable[..., Any], *args: Any) -> Artifact:
    """package() as without the worker, which stays up."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_costworker, "submit", lambda *_: None)
        return package(fn, *args)


def through_worker(fn: Callable[..., Any], *args: Any) -> Artifact:
    sent: list[bytes] = []
    submit = _costworker.submit

    def spy(bytecode: bytes, fallback: Callable[[], Any]) -> Any:
        request = submit(bytecode, fallback)
        if request is not None:
            sent.append(bytecode)
        return request

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_costworker, "submit", spy)
        artifact = package(fn, *args)
    assert len(sent) == 1
    return artifact


@pytest.mark.parametrize(("fn", "args"), PROGRAMS)
def test_the_worker_gives_the_same_artifact(
    worker: _costworker._Worker, fn: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    artifact = through_worker(fn, *args)
    assert artifact.flops > 0
    want = in_process(fn, *args)
    assert (artifact.flops, artifact.bytes) == (want.flops, want.bytes)
    assert artifact.manifest == want.manifest
    assert artifact.to_bytes() == want.to_bytes()


def test_the_worker_gives_the_same_step_artifact(worker: _costworker._Worker) -> None:
    from broker.portable.artifact import package_step

    state, x, y = sgd_args()
    got = package_step(sgd_step, state, x, y)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_costworker, "submit", lambda *_: None)
        want = package_step(sgd_step, state, x, y)
    assert got.manifest == want.manifest


@pytest.mark.parametrize("when", ["idle", "mid-request"])
def test_a_worker_that_dies_leaves_the_cost_to_this_process(
    worker: _costworker._Worker, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = worker.proc
    assert proc is not None
    if when == "idle":
        proc.kill()
        proc.wait()
    else:
        send = _costworker._Worker.send

        def send_and_die(self: _costworker._Worker, bytecode: bytes) -> None:
            send(self, bytecode)
            proc.kill()

        monkeypatch.setattr(_costworker._Worker, "send", send_and_die)
    params, x = mlp_args()
    artifact = through_worker(mlp, params, x)
    assert worker.dead
    assert proc.returncode is not None  # reaped
    assert artifact.manifest == in_process(mlp, params, x).manifest
    # The next package() runs in-process and starts another worker.
    package(mlp, params, x)
    assert _costworker._current is not worker
    assert _costworker._current is not None
    assert _costworker._current.settled.wait(120)
    assert _costworker._current.ready


def test_an_error_in_the_worker_is_the_analysis_run_here(worker: _costworker._Worker) -> None:
    request = _costworker.submit(b"not MLIR", lambda: "run here")
    assert request is not None
    assert _costworker.submit(b"", lambda: None) is None  # busy: one request at a time
    request.start()
    assert request.result() == "run here"
    assert worker.ready  # it answered {"error": ...} and goes on


def test_the_second_package_starts_the_worker_in_the_background(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stop_cost_worker()
    monkeypatch.setattr(_costworker, "_off", False)
    monkeypatch.setattr(_costworker, "_starts", 0)
    monkeypatch.setattr(_costworker, "_packaged_here", 0)
    stopped = _costworker._current
    params, x = mlp_args()
    in_thread = package(mlp, params, x)  # no worker yet: as before
    assert _costworker._current is stopped  # one program packaged: no worker started
    package(attention, jnp.ones((64, 32)), jnp.ones((64, 32)), jnp.ones((64, 32)))
    worker = _costworker._current
    assert worker is not None
    assert worker.settled.wait(120)
    assert worker.ready
    assert through_worker(mlp, params, x).manifest == in_thread.manifest


def test_a_worker_stopped_while_it_starts_is_reaped() -> None:
    stop_cost_worker()
    assert not start_cost_worker(wait=False)
    worker = _costworker._current
    assert worker is not None
    stop_cost_worker()
    assert worker.settled.wait(120)
    assert worker.dead
    assert not worker.ready
    assert worker.proc is None or worker.proc.returncode is not None


def test_the_setting_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    stop_cost_worker()
    monkeypatch.setenv("BROKER_PACKAGE_WORKER", "0")
    get_settings.cache_clear()
    assert not start_cost_worker(wait=True)
    params, x = mlp_args()
    package(mlp, params, x)
    package(lambda p, x: mlp(p, x), params, x)
    worker = _costworker._current
    assert worker is not None
    assert worker.dead
    assert worker.proc is None  # never started
    get_settings.cache_clear()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_the_worker_ends_with_its_parent() -> None:
    """Killed, the parent cannot close the worker: the end of its stdin does."""
    script = (
        "import os, sys, time\n"
        "from broker.portable import _costworker\n"
        "from broker.portable.artifact import start_cost_worker\n"
        "assert start_cost_worker(wait=True)\n"
        "print(_costworker._current.proc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    env = dict(os.environ, BROKER_PACKAGE_WORKER="1", PYTHONPATH=str(ROOT))
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
    ) as parent:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert _running(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 30
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(pid)


def _running(pid: int) -> bool:
    """Whether ``pid`` runs: not gone, and not a zombie waiting for init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
