"""The start-up of a run on this machine, and its cost per GB of data, measured when
the agent signs on.

A program's runtime on an offer is its work (estimated from its cost, docs/
market.md) plus what every run pays before and after the work: handing the
work order to a sandboxed child, checking the artifact, compiling it for this
backend, writing the result, and the requests to the broker that fetch the
program and its inputs and report the end. For a small job that is nearly all
of its metered time. A job with big inputs or results also pays for moving
them: reading and decoding the inputs in the child, writing the results. The
agent measures both on its own hardware with two programs run exactly as a
job's are, a tiny one and one that moves ``PROBE_BYTES`` in and out, and
reports them with its offers (``startup_seconds``, ``transfer_s_per_gb``);
clearing adds ``startup + transfer x (inputs + results)`` to every program's
estimated runtime on them, and replaces the start-up by its own figure once
enough finished runs of the model give one (``broker.market.estimates``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from broker.sandbox import Sandbox, limits_for

log = logging.getLogger(__name__)

# Requests a run makes of the broker besides its progress reports: start, fetch the
# program, fetch the inputs, upload the result, finish.
REQUESTS_PER_RUN = 5
# What the second probe program reads in and writes out: enough to time the transfer
# over the fixed start-up, little enough to take a fraction of a second.
PROBE_BYTES = 32 * 1024 * 1024


class ProbeFailed(RuntimeError):
    """The probe program did not run: the machine cannot run jobs as it is."""


def _probe(x: Any) -> Any:
    return (x @ x.T).sum(axis=0)


@dataclass(frozen=True, slots=True)
class Overheads:
    """What a run costs here besides its work."""

    startup_seconds: float  # every run: checks, writing, the broker's requests
    transfer_s_per_gb: float  # per GB of inputs and results moved in and out
    compile_s_per_kb: float = 0.0  # per KB of serialized program: compiling, a first run


def measure_startup(box: Sandbox, platform: str, round_trip: Callable[[], object]) -> Overheads:
    """A run's start-up and end on this machine: a tiny program's time in the sandbox
    as the agent sees it, from handing the work order over to the child's end
    (checks, compiling, running, writing the result, the child's exit), plus
    ``REQUESTS_PER_RUN`` times a round trip to the broker (``round_trip`` makes one
    request); the seconds per KB of program that compiling and a first run take, from
    a second, larger program (several kinds of operation, a loop); and the seconds per
    GB a run takes to move its data, from a third program that reads and writes
    ``PROBE_BYTES`` each way. The start-up is what a program of no size would take:
    the tiny program's time less its size's share.

    The tiny program runs first untimed: that run takes whatever child is at hand (at
    sign-on the spare may still be importing JAX); then each program runs twice on a
    warm spare, as a job arriving at a node between runs does, and the quicker run
    counts (a busy machine only ever slows a run down)."""
    from broker.portable.artifact import package
    from broker.portable.manifest import read_container

    x = np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    tiny = package(_probe, x, platforms=[platform]).to_bytes()
    _timed(box, platform, tiny, x, warm=False)
    seconds = min(_timed(box, platform, tiny, x, warm=True) for _ in range(2))
    mid = package(_mid, x, platforms=[platform])
    larger = min(_timed(box, platform, mid.to_bytes(), x, warm=True) for _ in range(2))
    tiny_kb = read_container(tiny)[0].program_size / 1000
    extra_kb = mid.manifest.program_size / 1000 - tiny_kb
    per_kb = max(0.0, larger - seconds) / extra_kb if extra_kb > 0 else 0.0
    big = np.ones((PROBE_BYTES // (4 * 1024), 1024), np.float32)
    doubling = package(_double, big, platforms=[platform]).to_bytes()
    moved = min(_timed(box, platform, doubling, big, warm=True) for _ in range(2))
    per_gb = max(0.0, moved - seconds) / (2 * big.nbytes - 2 * x.nbytes + 1e-9) * 1e9
    began = time.perf_counter()
    round_trip()
    trip = time.perf_counter() - began
    fixed = max(0.0, seconds - per_kb * tiny_kb)
    return Overheads(fixed + REQUESTS_PER_RUN * trip, per_gb, per_kb)


def _double(x: Any) -> Any:
    return x * 2


def _mid(x: Any) -> Any:
    """A program of the size of a small model's step: matrix products, a normalisation,
    a softmax and a loop."""
    import jax
    import jax.numpy as jnp

    h = jax.nn.gelu(x @ x.T)
    h = (h - h.mean(-1, keepdims=True)) / (h.std(-1, keepdims=True) + 1e-5)
    a = jax.nn.softmax(h @ h.T / 8.0, axis=-1)
    y = jax.lax.fori_loop(0, 4, lambda _, v: jnp.tanh(v @ a), h)
    return y.sum(0), jnp.max(y, axis=1)


def _timed(
    box: Sandbox, platform: str, artifact: bytes, x: np.ndarray[Any, Any], *, warm: bool
) -> float:
    """Seconds of one run of ``artifact`` on ``x`` as the agent sees it."""
    from broker.portable import arrays

    spec = {"platform": platform, "steps": None, "checkpoint_every": None,
            "checkpoint_step": 0, "cache_dir": None}  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="broker-probe-"))
    try:
        (workdir / "artifact.bin").write_bytes(artifact)
        arrays.write(workdir / "inputs.bin", [x])
        if warm:
            box.wait_spare(timeout=60)
        began = time.perf_counter()
        outcome = box.run(
            spec,
            workdir,
            limits_for({}, box.config, platform),
            should_stop=lambda: False,
            on_progress=lambda _: None,
            on_checkpoint=lambda *_: None,
        )
        wall = time.perf_counter() - began
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if outcome.kind != "succeeded" or outcome.total_seconds is None:
        raise ProbeFailed(f"the probe program did not run: {outcome.message or outcome.kind}")
    return max(wall, outcome.total_seconds)
