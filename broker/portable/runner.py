"""The runner: compile an artifact for this machine's backend and run it.

Provider agents call ``run``. It checks that the artifact was exported for the
local platform, compiles it (or loads it from the compilation cache, see
``executables``), runs it, and for iterative jobs runs the steps in chunks on
the device, saves checkpoints through a callback and resumes from one. Inputs,
checkpoints and outputs are flat lists of arrays in the artifact's leaf order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from broker.portable import _xla, executables
from broker.portable.arrays import DTYPES
from broker.portable.artifact import Artifact
from broker.portable.manifest import ArtifactError, TensorSpec

CheckpointFn = Callable[[int, list[np.ndarray[Any, Any]]], None]
ProgressFn = Callable[[int], None]


class RunError(RuntimeError):
    """The job cannot run here, or its program failed; the message says why."""


class Stopped(RunError):
    """``should_stop`` asked the run to stop (the job was cancelled or reassigned)."""


@dataclass
class Checkpoint:
    """The state of an iterative job after ``step`` steps."""

    step: int
    state: list[np.ndarray[Any, Any]]


@dataclass
class Timings:
    """Seconds spent in each phase of a run."""

    compile: float = 0.0
    run: float = 0.0
    checkpoint_write: float = 0.0
    checkpoint_restore: float = 0.0
    checkpoints: int = 0


@dataclass
class RunResult:
    outputs: list[np.ndarray[Any, Any]]
    platform: str
    steps_done: int
    timings: Timings = field(default_factory=Timings)


_cache_lock = threading.Lock()
_cache_dir: Path | None = None


def enable_compilation_cache(directory: Path) -> None:
    """Use ``directory`` as JAX's persistent compilation cache for this process.

    Every compile is cached, however short (JAX by default skips compiles under
    a second, which are most of a marketplace's small jobs), and the runner
    keeps its compiled programs there too, so that a fresh process starts a
    program it has run before without lowering it again.
    """
    global _cache_dir
    with _cache_lock:
        if _cache_dir == directory:
            return
        directory.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        _cache_dir = directory


def run(
    artifact: Artifact,
    inputs: Sequence[Any],
    *,
    steps: int | None = None,
    checkpoint_every: int | None = None,
    checkpoint: Checkpoint | None = None,
    on_checkpoint: CheckpointFn | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RunResult:
    """Run ``artifact`` on ``inputs`` (its flat input leaves) on the local backend.

    A ``function`` artifact runs once. An ``iterative`` one runs ``steps`` steps
    of ``state = step(state, *args)`` from ``checkpoint`` (or from the inputs'
    state), calls ``on_checkpoint(step, state)`` every ``checkpoint_every``
    steps, and returns the final state. The steps run in chunks, each one loop
    on the device of up to about ``CHUNK_SECONDS``: ``on_progress(step)``
    follows each chunk and ``should_stop()`` is asked before each one.
    """
    platform = _xla.local_platform()
    if platform not in artifact.platforms:
        raise RunError(
            f"this machine runs {platform}, but the artifact was exported only for "
            f"{', '.join(artifact.platforms)}"
        )
    manifest = artifact.manifest
    if len(inputs) != len(manifest.inputs):
        raise RunError(f"the program takes {len(manifest.inputs)} inputs; got {len(inputs)}")
    if manifest.kind == "function" and steps not in (None, 1):
        raise RunError("steps is for iterative jobs; this artifact is a plain function")
    timings = Timings()
    started = time.perf_counter()
    device = jax.devices()[0]
    leaves = [_on_device(x, device) for x in inputs]
    try:
        program = executables.load(artifact, leaves, device, _cache_dir)
    except (TypeError, ValueError) as e:
        raise RunError(f"the inputs do not fit the program: {e}") from e
    timings.compile = time.perf_counter() - started

    if manifest.kind == "function":
        started = time.perf_counter()
        outputs = [np.asarray(o) for o in program(*leaves)]
        timings.run = time.perf_counter() - started
        if on_progress is not None:
            on_progress(1)
        return RunResult(outputs, platform, 1, timings)

    total = steps or 1
    state_n = manifest.state_leaves or 0
    state, args = leaves[:state_n], leaves[state_n:]
    step = 0
    if checkpoint is not None:
        started = time.perf_counter()
        state = _restore(checkpoint, manifest.inputs[:state_n], device)
        step = checkpoint.step
        timings.checkpoint_restore = time.perf_counter() - started
    every = checkpoint_every or 0
    save = on_checkpoint if every else None
    chunk = 1  # grows once the time of a step is known
    started = time.perf_counter()
    while step < total:
        if should_stop is not None and should_stop():
            raise Stopped(f"stopped after {step} of {total} steps")
        end = min(total, step + chunk)
        if save is not None:  # a chunk ends at each checkpoint
            end = min(end, (step // every + 1) * every)
        began = time.perf_counter()
        state = program(np.int32(end - step), *state, *args)
        # Waiting for the chunk times it, and makes the progress report true.
        jax.block_until_ready(state)
        chunk = _next_chunk(end - step, time.perf_counter() - began)
        step = end
        if on_progress is not None:
            on_progress(step)
        if save is not None and step % every == 0 and step < total:
            saved = time.perf_counter()
            save(step, [np.asarray(x) for x in state])
            timings.checkpoint_write += time.perf_counter() - saved
            timings.checkpoints += 1
    outputs = [np.asarray(x) for x in state]
    timings.run = time.perf_counter() - started - timings.checkpoint_write
    return RunResult(outputs, platform, step, timings)


def serve(artifact: Artifact, example: Sequence[Any]) -> Callable[[Sequence[Any]], list[Any]]:
    """A function artifact compiled once for the local backend (and run once on
    ``example``, so that a first request does not pay for the device's warm-up),
    to call on inputs of the example's shapes, many times: a service's replica."""
    if artifact.manifest.kind != "function":
        raise RunError("a service runs a plain function; this artifact is iterative")
    first = run(artifact, example)  # checks the platform and inputs, compiles, runs
    del first
    device = jax.devices()[0]
    program = executables.load(
        artifact, [_on_device(x, device) for x in example], device, _cache_dir
    )

    def call(inputs: Sequence[Any]) -> list[Any]:
        if len(inputs) != len(artifact.manifest.inputs):
            raise RunError(
                f"the program takes {len(artifact.manifest.inputs)} inputs; got {len(inputs)}"
            )
        leaves = [_on_device(x, device) for x in inputs]
        try:
            return [np.asarray(o) for o in program(*leaves)]
        except (TypeError, ValueError) as e:
            raise RunError(f"the inputs do not fit the program: {e}") from e

    return call


CHUNK_SECONDS = 0.25
"""About how long one chunk of steps runs on the device before the runner reports
progress and asks ``should_stop``: long enough that the pause between chunks
(dispatch, then waiting for the device: up to a millisecond on a busy machine)
costs nothing measurable, short enough that a cancelled job stops well within
the provider's one-second progress reports."""


def _next_chunk(steps: int, seconds: float) -> int:
    """How many steps the next chunk runs, after ``steps`` took ``seconds``.

    Grows at most eightfold a chunk, so that steps that turn slower than the
    ones timed cannot commit the runner to a chunk far over its budget.
    """
    per_step = seconds / steps
    fit = int(CHUNK_SECONDS / per_step) if per_step > 0 else steps * 8
    return max(1, min(fit, steps * 8))


def _on_device(x: Any, device: Any) -> jax.Array:
    # An array already on the device is used as it is: the programs never
    # donate their inputs. Weakly typed ones are rebuilt, as numpy would.
    if isinstance(x, jax.Array) and not x.weak_type and x.devices() == {device}:
        return x
    moved: jax.Array = jax.device_put(np.asarray(x), device)
    return moved


def _restore(checkpoint: Checkpoint, specs: Sequence[TensorSpec], device: Any) -> list[jax.Array]:
    if len(checkpoint.state) != len(specs):
        raise ArtifactError(
            f"the checkpoint holds {len(checkpoint.state)} arrays; the state has {len(specs)}"
        )
    for i, (x, spec) in enumerate(zip(checkpoint.state, specs, strict=True)):
        if np.dtype(x.dtype) != DTYPES[spec.dtype] or len(x.shape) != len(spec.shape):
            raise ArtifactError(f"checkpoint leaf {i} does not match the state's {spec}")
    return [jax.device_put(x, device) for x in checkpoint.state]
