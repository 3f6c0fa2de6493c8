"""The start-up of a run on this machine, measured when the agent signs on.

A program's runtime on an offer is its work (estimated from its cost, docs/
market.md) plus what every run pays before and after the work: handing the
work order to a sandboxed child, checking the artifact, compiling it for this
backend, writing the result, and the requests to the broker that fetch the
program and its inputs and report the end. For a small job that is nearly all
of its metered time. The agent measures it on its own hardware with a tiny
program run exactly as a job's is, and reports it with its offers
(``startup_seconds``); clearing adds it to every program's estimated runtime
on them, until enough finished runs of the model let the broker fit its own
figure (``broker.market.estimates``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from broker.sandbox import Sandbox, limits_for

log = logging.getLogger(__name__)

# Requests a run makes of the broker besides its progress reports: start, fetch the
# program, fetch the inputs, upload the result, finish.
REQUESTS_PER_RUN = 5


class ProbeFailed(RuntimeError):
    """The probe program did not run: the machine cannot run jobs as it is."""


def _probe(x: Any) -> Any:
    return (x @ x.T).sum(axis=0)


def measure_startup(box: Sandbox, platform: str, round_trip: Callable[[], object]) -> float:
    """Seconds of a run's start-up and end on this machine: a tiny program's time in
    the sandbox as the agent sees it, from handing the work order over to the child's
    end (checks, compiling, running, writing the result, the child's exit), plus
    ``REQUESTS_PER_RUN`` times a round trip to the broker (``round_trip`` makes one
    request).

    The program runs twice: the first run takes whatever child is at hand (at
    sign-on the spare may still be importing JAX); the second, timed, takes a warm
    spare, as a job arriving at a node between runs does."""
    from broker.portable import arrays
    from broker.portable.artifact import package

    x = np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    artifact = package(_probe, x, platforms=[platform]).to_bytes()
    spec = {"platform": platform, "steps": None, "checkpoint_every": None,
            "checkpoint_step": 0, "cache_dir": None}  # fmt: skip
    seconds = 0.0
    for attempt in range(2):
        workdir = Path(tempfile.mkdtemp(prefix="broker-probe-"))
        try:
            (workdir / "artifact.bin").write_bytes(artifact)
            (workdir / "inputs.bin").write_bytes(arrays.encode([x]))
            if attempt:
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
        seconds = max(wall, outcome.total_seconds)
    began = time.perf_counter()
    round_trip()
    trip = time.perf_counter() - began
    return seconds + REQUESTS_PER_RUN * trip
