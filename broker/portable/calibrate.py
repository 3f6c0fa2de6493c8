"""Calibration: what this machine's CPU really achieves, and how well the roofline predicts it.

``broker calibrate`` measures the achieved matmul throughput (fp32 and bf16)
and memory bandwidth of the local ``cpu`` backend, then runs a few reference
programs through the portability layer and compares their measured runtimes
with the market's roofline estimate from XLA's cost analysis. The figures are
saved as ``calibration.json`` in the data directory, where the CPU adapter
reads them to describe this machine's offer.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from broker.portable import runner
from broker.portable.artifact import package

FILE_NAME = "calibration.json"


@dataclass
class Reference:
    """One reference program: the roofline's estimate against the measured runtime."""

    name: str
    flops: float
    bytes: float
    predicted_s: float
    measured_s: float

    @property
    def ratio(self) -> float:
        return self.predicted_s / self.measured_s


@dataclass
class Calibration:
    cpu: str
    cores: int
    memory_gib: float
    tflops_fp32: float
    tflops_bf16: float
    mem_bw_gbps: float
    efficiency: float  # median predicted/measured over the references, at most 1
    references: list[Reference]
    jax_version: str
    measured_at: str

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for ref, row in zip(self.references, data["references"], strict=True):
            row["ratio"] = ref.ratio
        return data


def _best(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def measure_matmul(dtype: Any, n: int = 2048, repeats: int = 3) -> float:
    """Achieved TFLOP/s of an n x n matmul in ``dtype``."""
    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    seconds = _best(lambda: matmul(a, b), repeats)
    return 2 * n**3 / seconds / 1e12


def measure_bandwidth(mib: int = 256, repeats: int = 3) -> float:
    """Achieved GB/s reading a ``mib`` MiB float32 array (a sum: no output to allocate,
    whose page faults would otherwise be measured instead of memory)."""
    x = jnp.ones((mib * 1024 * 1024 // 4,), jnp.float32)
    stream = jax.jit(jnp.sum)
    seconds = _best(lambda: stream(x), repeats)
    return x.nbytes / seconds / 1e9


def _references() -> list[tuple[str, Callable[..., Any], tuple[Any, ...]]]:
    rng = np.random.default_rng(0)

    def mlp(params: list[Any], x: Any) -> Any:
        for w in params:
            x = jax.nn.relu(x @ w)
        return x

    def layernorm_gelu(x: Any) -> Any:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return jax.nn.gelu((x - mean) / jnp.sqrt(var + 1e-5))

    def attention(q: Any, k: Any, v: Any) -> Any:
        scores = jax.nn.softmax(q @ k.T / np.sqrt(q.shape[-1]))
        return scores @ v

    def f32(*shape: int) -> Any:
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    return [
        ("mlp 4x1024, batch 512 (compute-bound)", mlp, ([f32(1024, 1024)] * 4, f32(512, 1024))),
        ("layernorm+gelu 16M floats (memory-bound)", layernorm_gelu, (f32(4096, 4096),)),
        (
            "attention 1024 tokens x 256",
            attention,
            (f32(1024, 256), f32(1024, 256), f32(1024, 256)),
        ),
    ]


def measure_reference(
    name: str, fn: Callable[..., Any], args: tuple[Any, ...], peak_flops: float, peak_bw: float
) -> Reference:
    artifact = package(fn, *args, platforms=("cpu",))
    leaves = jax.tree.leaves(args)
    runner.run(artifact, leaves)  # compile once
    measured = min(runner.run(artifact, leaves).timings.run for _ in range(3))
    predicted = max(artifact.flops / peak_flops, artifact.bytes / peak_bw)
    return Reference(name, artifact.flops, artifact.bytes, predicted, measured)


def calibrate(quick: bool = False) -> Calibration:
    """Measure this machine. ``quick`` uses smaller problems (for tests)."""
    n, mib, repeats = (512, 32, 2) if quick else (2048, 256, 3)
    fp32 = measure_matmul(jnp.float32, n, repeats)
    bf16 = measure_matmul(jnp.bfloat16, n, repeats)
    bandwidth = measure_bandwidth(mib, repeats)
    references = [
        measure_reference(name, fn, args, fp32 * 1e12, bandwidth * 1e9)
        for name, fn, args in (_references()[:1] if quick else _references())
    ]
    return Calibration(
        cpu=_cpu_name(),
        cores=os.cpu_count() or 1,
        memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        tflops_fp32=round(fp32, 4),
        tflops_bf16=round(bf16, 4),
        mem_bw_gbps=round(bandwidth, 2),
        efficiency=round(min(1.0, statistics.median(r.ratio for r in references)), 3),
        references=references,
        jax_version=jax.__version__,
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def save(calibration: Calibration, data_dir: Path) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / FILE_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(calibration.to_json(), indent=2) + "\n")
    tmp.replace(path)
    return path


def load(data_dir: Path) -> dict[str, Any] | None:
    """The saved calibration of this machine, or None if it was never calibrated."""
    path = data_dir / FILE_NAME
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def report(calibration: Calibration) -> str:
    """A table for people: peaks, then predicted versus measured per reference."""
    lines = [
        f"CPU: {calibration.cpu} ({calibration.cores} cores, {calibration.memory_gib} GiB)",
        f"achieved matmul: {calibration.tflops_fp32 * 1000:.1f} GFLOP/s fp32, "
        f"{calibration.tflops_bf16 * 1000:.1f} GFLOP/s bf16; "
        f"memory bandwidth: {calibration.mem_bw_gbps:.1f} GB/s",
        "",
        f"{'reference program':44} {'GFLOP':>8} {'MB':>8} {'predicted':>10} {'measured':>10} "
        f"{'pred/meas':>9}",
    ]
    for r in calibration.references:
        lines.append(
            f"{r.name:44} {r.flops / 1e9:8.2f} {r.bytes / 1e6:8.1f} {r.predicted_s * 1e3:8.2f}ms "
            f"{r.measured_s * 1e3:8.2f}ms {r.ratio:9.2f}"
        )
    lines.append("")
    lines.append(
        f"efficiency (median predicted/measured at measured peaks): {calibration.efficiency}"
    )
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
