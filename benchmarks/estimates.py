"""Runtime estimates against measured runtimes: `python -m benchmarks.estimates`.

The market estimates a job's runtime on an offer from its program alone: the
roofline ``max(flops / (F e), bytes / (B e))`` over the manifest's flops and
bytes (XLA's cost analysis of the program as XLA optimizes it, loops counted
as often as they run) and the offer's peak throughput ``F``, bandwidth ``B``
and efficiency ``e`` (docs/market.md). This benchmark packages a suite of
programs of the kinds users submit, at two sizes each, through the
portability layer, runs each through the runner on this machine's CPU, and
prints predicted against measured time (the run itself, best of three after a
first run that compiles; start-up is printed apart).

Peaks are measured in the same run (``broker calibrate``'s matmul and
bandwidth), and the efficiency ``e`` is the calibration's: the median ratio
over its own reference programs, which are not in this suite, so that the
suite's ratios are an honest test of the model rather than a fit to it.

With ``--startup`` it also measures what a market estimate covers: each
program run as an agent runs a job (in a fresh sandboxed child taken warm,
compiled without a cache, its result written), against the roofline plus the
start-up the agent's probe measures on signing on (``broker.agent.probe``, with
no broker to talk to: the round trips are left out of both).

    python -m benchmarks.estimates            # the whole suite
    python -m benchmarks.estimates --quick    # the smaller size only
    python -m benchmarks.estimates --startup  # and each run start-up included
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from broker.portable import arrays, calibrate, runner
from broker.portable.artifact import package
from broker.portable.manifest import io_bytes


@dataclass
class Row:
    kind: str
    size: str
    flops: float
    bytes: float
    predicted_s: float
    measured_s: float
    startup_s: float  # the first run: compile (no cache) and transfer
    io_bytes: float = 0.0  # what a run moves: the inputs in, the results out (as the broker counts)
    program_bytes: int = 0  # the serialized program's size
    # Start-up included (--startup): the roofline plus the probe's start-up, against a
    # run in a sandboxed child as the agent runs it.
    predicted_total_s: float | None = None
    measured_total_s: float | None = None

    @property
    def ratio(self) -> float:
        return self.predicted_s / self.measured_s

    @property
    def total_ratio(self) -> float | None:
        if self.predicted_total_s is None or not self.measured_total_s:
            return None
        return self.predicted_total_s / self.measured_total_s


def _f32(rng: np.random.Generator, *shape: int) -> jax.Array:
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _layernorm_gelu(x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return jax.nn.gelu((x - mean) / jnp.sqrt(var + 1e-5))


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.nn.softmax(q @ k.T / np.sqrt(q.shape[-1])) @ v


def _mlp_step(params: list[jax.Array], x: jax.Array, y: jax.Array) -> list[jax.Array]:
    def loss(p: list[jax.Array]) -> jax.Array:
        h = x
        for w in p[:-1]:
            h = jax.nn.relu(h @ w)
        return jnp.mean((h @ p[-1] - y) ** 2)

    grads = jax.grad(loss)(params)
    return [p - 0.01 * g for p, g in zip(params, grads, strict=True)]


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _softmax(x: jax.Array) -> jax.Array:
    return jax.nn.softmax(x, axis=-1)


def _reductions(x: jax.Array) -> jax.Array:
    return jnp.sum(x, axis=1) + jnp.max(x, axis=1) + jnp.mean(x * x, axis=1)


def _embedding(table: jax.Array, ids: jax.Array, grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    return table[ids].sum(0), jnp.zeros_like(table).at[ids].add(grad)


def _scan_rnn(w: jax.Array, xs: jax.Array) -> jax.Array:
    def cell(h: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = jnp.tanh(h @ w + x)
        return h, h

    final: jax.Array = lax.scan(cell, jnp.zeros(xs.shape[1:]), xs)[0]
    return final


def _block(
    x: jax.Array, wq: jax.Array, wk: jax.Array, wv: jax.Array, w1: jax.Array, w2: jax.Array
) -> jax.Array:
    h = _layernorm_gelu(x)
    x = x + _attention(h @ wq, h @ wk, h @ wv)
    return x + jax.nn.gelu(_layernorm_gelu(x) @ w1) @ w2


def _iterative(x: jax.Array, w: jax.Array) -> jax.Array:
    final: jax.Array = lax.fori_loop(0, 50, lambda i, s: jnp.tanh(s @ w), x)
    return final


def _tiny(x: jax.Array) -> jax.Array:
    return x * 2.0 + 1.0


Program = tuple[Callable[..., Any], tuple[Any, ...]]


def suite(rng: np.random.Generator) -> list[tuple[str, list[tuple[str, Callable[[], Program]]]]]:
    """Each kind of program, at a small and a large size (built lazily)."""

    def f(*shape: int) -> jax.Array:
        return _f32(rng, *shape)

    return [
        (
            "dense MLP training step",
            [
                (
                    "3x512, batch 256",
                    lambda: (_mlp_step, ([f(512, 512)] * 3, f(256, 512), f(256, 512))),
                ),
                (
                    "3x1024, batch 256",
                    lambda: (_mlp_step, ([f(1024, 1024)] * 3, f(256, 1024), f(256, 1024))),
                ),
            ],
        ),
        (
            "attention",
            [
                ("512 tokens x 128", lambda: (_attention, (f(512, 128), f(512, 128), f(512, 128)))),
                (
                    "2048 tokens x 128",
                    lambda: (_attention, (f(2048, 128), f(2048, 128), f(2048, 128))),
                ),
            ],
        ),
        (
            "convolution 3x3",
            [
                ("8x32x32x32 -> 64", lambda: (_conv, (f(8, 32, 32, 32), f(3, 3, 32, 64)))),
                ("8x64x64x32 -> 64", lambda: (_conv, (f(8, 64, 64, 32), f(3, 3, 32, 64)))),
            ],
        ),
        (
            "layernorm+gelu",
            [
                ("1024x4096", lambda: (_layernorm_gelu, (f(1024, 4096),))),
                ("4096x4096", lambda: (_layernorm_gelu, (f(4096, 4096),))),
            ],
        ),
        (
            "softmax",
            [
                ("1024x4096", lambda: (_softmax, (f(1024, 4096),))),
                ("4096x4096", lambda: (_softmax, (f(4096, 4096),))),
            ],
        ),
        (
            "row reductions",
            [
                ("1024x4096", lambda: (_reductions, (f(1024, 4096),))),
                ("4096x4096", lambda: (_reductions, (f(4096, 4096),))),
            ],
        ),
        (
            "embedding gather/scatter",
            [
                (
                    "50k x 256, 4k ids",
                    lambda: (
                        _embedding,
                        (f(50_000, 256), jnp.asarray(rng.integers(0, 50_000, 4096)), f(4096, 256)),
                    ),
                ),
                (
                    "50k x 256, 32k ids",
                    lambda: (
                        _embedding,
                        (
                            f(50_000, 256),
                            jnp.asarray(rng.integers(0, 50_000, 32768)),
                            f(32768, 256),
                        ),
                    ),
                ),
            ],
        ),
        (
            "lax.scan recurrence",
            [
                ("64 steps, 64x256", lambda: (_scan_rnn, (f(256, 256), f(64, 64, 256)))),
                ("256 steps, 64x256", lambda: (_scan_rnn, (f(256, 256), f(256, 64, 256)))),
            ],
        ),
        (
            "transformer block",
            [
                (
                    "256 tokens x 256",
                    lambda: (
                        _block,
                        (
                            f(256, 256),
                            f(256, 256),
                            f(256, 256),
                            f(256, 256),
                            f(256, 1024),
                            f(1024, 256),
                        ),
                    ),
                ),
                (
                    "1024 tokens x 256",
                    lambda: (
                        _block,
                        (
                            f(1024, 256),
                            f(256, 256),
                            f(256, 256),
                            f(256, 256),
                            f(256, 1024),
                            f(1024, 256),
                        ),
                    ),
                ),
            ],
        ),
        (
            "iterative (50 steps)",
            [
                ("256x256", lambda: (_iterative, (f(256, 256), f(256, 256)))),
                ("256x1024", lambda: (_iterative, (f(256, 1024), f(1024, 1024)))),
            ],
        ),
        (
            "tiny",
            [
                ("16 floats", lambda: (_tiny, (f(16),))),
                ("64k floats", lambda: (_tiny, (f(65536),))),
            ],
        ),
    ]


def measure(
    kind: str, size: str, program: Program, peak_flops: float, peak_bw: float, efficiency: float
) -> Row:
    fn, args = program
    artifact = package(fn, *args, platforms=("cpu",))
    leaves = jax.tree.leaves(args)
    started = time.perf_counter()
    runner.run(artifact, leaves)  # the first run compiles
    startup = time.perf_counter() - started
    measured = min(runner.run(artifact, leaves).timings.run for _ in range(3))
    predicted = max(
        artifact.flops / (peak_flops * efficiency), artifact.bytes / (peak_bw * efficiency)
    )
    moved = io_bytes(artifact.manifest, len(arrays.encode(leaves)), None, None)
    return Row(
        kind,
        size,
        artifact.flops,
        artifact.bytes,
        predicted,
        measured,
        startup,
        moved,
        artifact.manifest.program_size,
    )


def in_sandbox(box: Any, program: Program) -> float:
    """Seconds of one run of ``program`` as an agent runs a job: a warm child, the
    program checked, compiled (no cache) and run, its result written."""
    import shutil
    import tempfile
    from pathlib import Path

    from broker.portable import arrays
    from broker.sandbox import limits_for

    fn, args = program
    workdir = Path(tempfile.mkdtemp(prefix="broker-estimates-"))
    try:
        (workdir / "artifact.bin").write_bytes(package(fn, *args, platforms=("cpu",)).to_bytes())
        (workdir / "inputs.bin").write_bytes(arrays.encode(jax.tree.leaves(args)))
        spec = {"platform": "cpu", "steps": None, "checkpoint_every": None,
                "checkpoint_step": 0, "cache_dir": None}  # fmt: skip
        box.wait_spare(timeout=60)
        began = time.perf_counter()
        outcome = box.run(
            spec,
            workdir,
            limits_for({}, box.config, "cpu"),
            should_stop=lambda: False,
            on_progress=lambda _: None,
            on_checkpoint=lambda *_: None,
        )
        wall = time.perf_counter() - began
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if outcome.kind != "succeeded":
        raise RuntimeError(f"the run did not succeed: {outcome.message or outcome.kind}")
    return float(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the smaller size of each kind only")
    parser.add_argument(
        "--startup", action="store_true", help="also each run start-up included, in a sandbox"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cal = calibrate.calibrate()
    peak_flops, peak_bw = cal.tflops_fp32 * 1e12, cal.mem_bw_gbps * 1e9
    box = None
    startup = per_gb = per_kb = 0.0
    if args.startup:
        from broker.agent.probe import measure_startup
        from broker.sandbox import Sandbox, SandboxConfig

        box = Sandbox(SandboxConfig(isolate=False))
        overheads = measure_startup(box, "cpu", lambda: None)
        startup, per_gb = overheads.startup_seconds, overheads.transfer_s_per_gb
        per_kb = overheads.compile_s_per_kb
        if not args.json:
            print(
                f"measured by the agent's probe: start-up {startup * 1e3:.0f} ms, "
                f"compiling {per_kb * 1e3:.1f} ms per KB, transfer {per_gb:.2f} s per GB",
                flush=True,
            )
    rows = []
    try:
        for kind, sizes in suite(np.random.default_rng(0)):
            for size, build in sizes[:1] if args.quick else sizes:
                program = build()
                row = measure(kind, size, program, peak_flops, peak_bw, cal.efficiency)
                if box is not None:
                    row.predicted_total_s = (
                        startup
                        + per_gb * row.io_bytes / 1e9
                        + per_kb * row.program_bytes / 1e3
                        + row.predicted_s
                    )
                    row.measured_total_s = in_sandbox(box, program)
                rows.append(row)
                if not args.json:
                    total = (
                        f" {row.predicted_total_s * 1e3:9.0f} {row.measured_total_s * 1e3:9.0f} "
                        f"{row.total_ratio:6.2f}"
                        if row.predicted_total_s is not None and row.measured_total_s is not None
                        else ""
                    )
                    print(
                        f"{row.kind:26} {row.size:20} {row.flops / 1e9:9.3f} "
                        f"{row.bytes / 1e6:9.1f} {row.predicted_s * 1e3:10.3f} "
                        f"{row.measured_s * 1e3:10.3f} {row.ratio:7.2f} "
                        f"{row.startup_s * 1e3:9.1f}{total}",
                        flush=True,
                    )
    finally:
        if box is not None:
            box.close()
    ratios = [r.ratio for r in rows]
    spread = [max(x, 1 / x) for x in ratios]
    summary: dict[str, Any] = {
        "peak_gflops": cal.tflops_fp32 * 1e3,
        "bandwidth_gbps": cal.mem_bw_gbps,
        "efficiency": cal.efficiency,
        "median_ratio": statistics.median(ratios),
        "within_1_5x": sum(s <= 1.5 for s in spread),
        "programs": len(rows),
        "worst": max(spread),
    }
    totals = [t for r in rows if (t := r.total_ratio) is not None]
    if totals:
        summary |= {
            "startup_ms": startup * 1e3,
            "transfer_s_per_gb": per_gb,
            "compile_s_per_kb": per_kb,
            "median_ratio_with_startup": statistics.median(totals),
            "within_1_5x_with_startup": sum(max(t, 1 / t) <= 1.5 for t in totals),
            "worst_with_startup": max(max(t, 1 / t) for t in totals),
        }
    if args.json:
        print(
            json.dumps(
                {
                    "rows": [
                        asdict(r) | {"ratio": r.ratio, "total_ratio": r.total_ratio} for r in rows
                    ],
                    "summary": summary,
                },
                indent=2,
            )
        )
    else:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
