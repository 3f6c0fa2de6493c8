"""Benchmark of the portability layer: `python -m benchmarks.portable`.

Prints, for this machine's cpu backend:
- packaging for 4 platforms versus one `jax.jit(f).lower()` (both cold: a new
  function each time, so no trace or lowering cache helps either), with the
  cost worker ready (steady state) and with it off;
- warm-cache start (a fresh process, persistent compilation cache filled):
  artifact bytes to first result through the runner, versus `jax.jit` to first
  result;
- per-step time of an iterative job through the runner versus a plain
  `jax.jit` loop (one dispatch a step) and versus one `jax.jit` of a
  `lax.fori_loop` over all the steps (what the runner does, in chunks), and
  checkpoint write (device to host, bundle) and restore;
- a sandboxed run (``broker.sandbox``: a child process per run, a spare
  child kept ready) versus a run in the agent's own process: start-up with a
  warm cache, the cold start the spare hides, and per-step time;
- the roofline's predicted over measured runtime for the calibration programs.
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from broker.portable import arrays, calibrate, runner
from broker.portable.artifact import (
    Artifact,
    package,
    package_step,
    start_cost_worker,
    stop_cost_worker,
)


def make_step(width: int) -> Callable[..., Any]:
    """A new MLP training step each call (defeats JAX's caches for cold timings)."""

    def loss(params: list[Any], x: Any, y: Any) -> Any:
        for w, b in params[:-1]:
            x = jax.nn.relu(x @ w + b)
        w, b = params[-1]
        return jnp.mean((x @ w + b - y) ** 2)

    def step(state: tuple[Any, Any], x: Any, y: Any) -> tuple[Any, Any]:
        params, count = state
        grads = jax.grad(loss)(params, x, y)
        return jax.tree.map(lambda p, g: p - 0.01 * g, params, grads), count + 1

    return step


def step_args(width: int, layers: int = 4, batch: int = 64) -> tuple[Any, Any, Any]:
    rng = np.random.default_rng(0)
    params = [
        (jnp.asarray(rng.normal(size=(width, width)) * 0.05, jnp.float32), jnp.zeros(width))
        for _ in range(layers)
    ]
    x = jnp.asarray(rng.normal(size=(batch, width)), jnp.float32)
    return (params, jnp.int32(0)), x, jnp.zeros((batch, width))


def make_attention() -> Callable[..., Any]:
    def attention(q: Any, k: Any, v: Any) -> Any:
        return jax.nn.softmax(q @ k.T / 16.0) @ v

    return attention


def packaging(repeats: int = 7, worker: bool = True) -> list[tuple[str, float, float]]:
    """Median seconds of one ``jax.jit(f).lower()`` and of packaging, per program.

    Steady state: with ``worker``, the cost worker is started and ready before
    timing (as after a process's second package()); without it, it is stopped and
    XLA's cost analysis runs in-process. Either way each timing packages a new
    function.
    """
    if worker:
        if not start_cost_worker(wait=True):
            raise RuntimeError("the cost worker did not start (BROKER_PACKAGE_WORKER=0?)")
    else:
        stop_cost_worker()
    rows = []
    cases: list[tuple[str, Callable[[], Callable[..., Any]], tuple[Any, ...], bool]] = [
        ("mlp training step 4x256", lambda: make_step(256), step_args(256), True),
        ("mlp training step 8x512", lambda: make_step(512), step_args(512, layers=8), True),
        ("attention 512x128", make_attention, (jnp.ones((512, 128)),) * 3, False),
    ]
    for name, factory, args, iterative in cases:
        lower, pack = [], []
        for _ in range(repeats):
            fn = factory()
            start = time.perf_counter()
            jax.jit(fn).lower(*args)
            lower.append(time.perf_counter() - start)
            fn = factory()
            start = time.perf_counter()
            if iterative:
                package_step(fn, args[0], *args[1:]).to_bytes()
            else:
                package(fn, *args).to_bytes()
            pack.append(time.perf_counter() - start)
        rows.append((name, statistics.median(lower), statistics.median(pack)))
    return rows


_START = """
import sys, time, pickle
import jax, numpy as np
from pathlib import Path
jax.config.update("jax_compilation_cache_dir", sys.argv[2])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
sys.path.insert(0, {root!r})
from benchmarks.portable import make_step, step_args
from broker.portable import runner
from broker.portable.artifact import Artifact
args = step_args(512, layers=8)
leaves = jax.tree.leaves(args)
data = Path(sys.argv[3]).read_bytes()
start = time.perf_counter()
if sys.argv[1] == "plain":
    out = jax.jit(make_step(512))(*args)
    jax.block_until_ready(out)
else:
    runner._cache_dir = Path(sys.argv[2])
    runner.run(Artifact.from_bytes(data), leaves, steps=1)
print(time.perf_counter() - start)
"""


def warm_start(repeats: int = 5) -> tuple[float, float]:
    """Median seconds to the first result in a fresh process with a warm cache."""
    root = str(Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "step.artifact"
        args = step_args(512, layers=8)
        artifact.write_bytes(package_step(make_step(512), args[0], *args[1:]).to_bytes())
        script = _START.format(root=root)
        cache = str(Path(tmp) / "cache")

        def once(mode: str) -> float:
            out = subprocess.run(  # noqa: S603 - our own interpreter and script
                [sys.executable, "-c", script, mode, cache, str(artifact)],
                capture_output=True,
                text=True,
                check=True,
            )
            return float(out.stdout.strip().splitlines()[-1])

        once("plain"), once("layer")  # fill the cache
        plain = statistics.median(once("plain") for _ in range(repeats))
        layer = statistics.median(once("layer") for _ in range(repeats))
    return plain, layer


def per_step(steps: int = 2000, repeats: int = 5) -> dict[str, float]:
    args = step_args(128, layers=2, batch=32)
    step = make_step(128)
    artifact = package_step(step, args[0], *args[1:])
    leaves = jax.tree.leaves(args)
    jitted = jax.jit(step)

    def plain() -> float:
        state = jitted(*args)
        jax.block_until_ready(state)
        start = time.perf_counter()
        state = args[0]
        for _ in range(steps):
            state = jitted(state, args[1], args[2])
        jax.block_until_ready(state)
        return time.perf_counter() - start

    looped = jax.jit(lambda state, x, y: lax.fori_loop(0, steps, lambda _, s: step(s, x, y), state))

    def fori() -> float:
        start = time.perf_counter()
        jax.block_until_ready(looped(*args))
        return time.perf_counter() - start

    def layer() -> float:
        return runner.run(artifact, leaves, steps=steps).timings.run

    fori(), layer()  # compile
    plain_s = min(plain() for _ in range(repeats))
    fori_s = min(fori() for _ in range(repeats))
    layer_s = min(layer() for _ in range(repeats))

    saved: dict[int, Any] = {}

    def keep(step: int, state: list[Any]) -> None:
        saved[step] = arrays.encode(state)  # what a provider uploads

    big = step_args(1024, layers=8)
    big_artifact = package_step(make_step(1024), big[0], *big[1:])
    big_leaves = jax.tree.leaves(big)
    run = runner.run(big_artifact, big_leaves, steps=4, checkpoint_every=2, on_checkpoint=keep)
    restore_from = arrays.decode(saved[2])
    resumed = runner.run(
        big_artifact, big_leaves, steps=4, checkpoint=runner.Checkpoint(2, restore_from)
    )
    return {
        "plain_us": plain_s / steps * 1e6,
        "fori_us": fori_s / steps * 1e6,
        "layer_us": layer_s / steps * 1e6,
        "checkpoint_mb": len(saved[2]) / 1e6,
        "checkpoint_write_s": run.timings.checkpoint_write,
        "checkpoint_restore_s": resumed.timings.checkpoint_restore,
    }


def sandbox_start(repeats: int = 7, steps: int = 20_000) -> dict[str, float]:
    """What running in a sandboxed child costs a provider, against running in the
    agent's own process as before: median seconds from the artifact's bytes to the
    result's, with a warm compilation cache, for a single call of a 512-wide,
    8-layer MLP step; the same with no spare child ready (the cold start a spare
    hides); and the per-step time of an iterative job in the child and here."""
    from broker.sandbox import Sandbox, SandboxConfig, limits_for

    args = step_args(512, layers=8)
    leaves = jax.tree.leaves(args)
    data = package_step(make_step(512), args[0], *args[1:]).to_bytes()
    small = step_args(128, layers=2, batch=32)
    small_leaves = jax.tree.leaves(small)
    small_data = package_step(make_step(128), small[0], *small[1:]).to_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        runner.enable_compilation_cache(cache)
        box = Sandbox(SandboxConfig(), cache)
        limits = limits_for({"accelerators": 1}, box.config, "cpu")

        def in_process(blob: bytes, inputs: list[Any], n: int) -> tuple[float, float]:
            start = time.perf_counter()
            result = runner.run(Artifact.from_bytes(blob), inputs, steps=n)
            arrays.encode(result.outputs)
            return time.perf_counter() - start, result.timings.run

        def sandboxed(blob: bytes, inputs: list[Any], n: int) -> tuple[float, float]:
            workdir = Path(tempfile.mkdtemp(prefix="broker-bench-"))
            try:
                start = time.perf_counter()
                (workdir / "artifact.bin").write_bytes(blob)
                (workdir / "inputs.bin").write_bytes(arrays.encode(inputs))
                key = hashlib.sha256(blob).hexdigest()
                spec = {
                    "platform": "cpu",
                    "steps": n,
                    "checkpoint_every": None,
                    "checkpoint_step": 0,
                    "cache_dir": str(box.cache_for(key)),
                }
                outcome = box.run(
                    spec,
                    workdir,
                    limits,
                    should_stop=lambda: False,
                    on_progress=lambda step: None,
                    on_checkpoint=lambda step, path: None,
                )
                assert outcome.kind == "succeeded", outcome.message
                assert outcome.result is not None
                outcome.result.read_bytes()
                return time.perf_counter() - start, outcome.run_seconds or 0.0
            finally:
                shutil.rmtree(workdir, ignore_errors=True)

        def spare_ready() -> None:
            spare = box._spare
            if spare is not None:
                spare.wait_ready(120)

        for blob, inputs in ((data, leaves), (small_data, small_leaves)):
            in_process(blob, inputs, 1)  # fill the caches, here and the child's
            spare_ready()
            sandboxed(blob, inputs, 1)
        here, warm, cold = [], [], []
        for _ in range(repeats):
            here.append(in_process(data, leaves, 1)[0])
            spare_ready()
            warm.append(sandboxed(data, leaves, 1)[0])
        box.close()
        box = Sandbox(SandboxConfig(), cache, spare=False)
        for _ in range(3):
            cold.append(sandboxed(data, leaves, 1)[0])
        box.close()
        box = Sandbox(SandboxConfig(), cache)
        spare_ready()
        per_step_here = min(in_process(small_data, small_leaves, steps)[1] for _ in range(3))
        per_step_child = []
        for _ in range(3):
            spare_ready()
            per_step_child.append(sandboxed(small_data, small_leaves, steps)[1])
        box.close()
    return {
        "in_process_s": statistics.median(here),
        "sandbox_s": statistics.median(warm),
        "cold_child_s": statistics.median(cold),
        "step_here_us": per_step_here / steps * 1e6,
        "step_child_us": min(per_step_child) / steps * 1e6,
    }


def main() -> None:
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0]}")
    print("\npackaging for cpu+cuda+rocm+tpu vs one jax.jit(f).lower() (median of 7, cold)")
    for worker, label in [
        (True, "cost worker started and ready before timing (the default, steady state)"),
        (False, "cost worker off (BROKER_PACKAGE_WORKER=0): XLA's cost analysis in-process"),
    ]:
        print(f"  {label}")
        for name, lower, pack in packaging(worker=worker):
            print(
                f"    {name:28} lower {lower * 1e3:7.1f} ms  package {pack * 1e3:7.1f} ms  "
                f"ratio {pack / lower:.2f}"
            )
    start_cost_worker(wait=False)  # the rest packages as by default
    plain, layer = warm_start()
    print("\nwarm-cache start, fresh process, to the first result (median of 5)")
    print(
        f"  plain jax.jit {plain * 1e3:.0f} ms, through the layer {layer * 1e3:.0f} ms, "
        f"ratio {layer / plain:.2f}"
    )
    steps = per_step()
    print("\niterative job, per step (best of 5 runs of 2000 steps)")
    print(
        f"  plain jax.jit loop {steps['plain_us']:.1f} us, runner {steps['layer_us']:.1f} us, "
        f"overhead {(steps['layer_us'] / steps['plain_us'] - 1) * 100:+.1f}%"
    )
    print(
        f"  plain jax.jit of a fori_loop {steps['fori_us']:.1f} us, runner (chunked loop) "
        f"{(steps['layer_us'] / steps['fori_us'] - 1) * 100:+.1f}% against it"
    )
    print(
        f"  checkpoint of an 8x1024 MLP state ({steps['checkpoint_mb']:.1f} MB): write "
        f"{steps['checkpoint_write_s'] * 1e3:.1f} ms, restore "
        f"{steps['checkpoint_restore_s'] * 1e3:.1f} ms"
    )
    box = sandbox_start()
    print("\nsandboxed run (a child process per run) vs in the agent's process, warm cache")
    print(
        f"  artifact bytes to result bytes, 8x512 MLP step, median of 7: in-process "
        f"{box['in_process_s'] * 1e3:.0f} ms, sandboxed {box['sandbox_s'] * 1e3:.0f} ms "
        f"(+{(box['sandbox_s'] - box['in_process_s']) * 1e3:.0f} ms; target +500 ms); "
        f"with no spare child ready {box['cold_child_s'] * 1e3:.0f} ms"
    )
    print(
        f"  per step, 20,000 steps of a 2x128 MLP (best of 3): in-process "
        f"{box['step_here_us']:.1f} us, in the child {box['step_child_us']:.1f} us "
        f"({(box['step_child_us'] / box['step_here_us'] - 1) * 100:+.1f}%)"
    )
    print("\nruntime prediction on cpu (broker calibrate)")
    print("  " + calibrate.report(calibrate.calibrate()).replace("\n", "\n  "))


if __name__ == "__main__":
    main()
