"""The cost a manifest states, and the runtime estimates built on it, come from
the program as XLA will run it: fused, and with each loop counted as often as
it runs (``broker.portable._cost.hlo_cost``)."""

from __future__ import annotations

import struct
from typing import Any

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from broker.portable.artifact import Artifact, package
from broker.portable.checks import verify_artifact
from broker.portable.manifest import MAGIC, ArtifactError

N = 128
MATMUL = 2 * N**3  # flops of one N x N matmul


def _rebuild(artifact: Artifact, **claims: Any) -> bytes:
    manifest = artifact.manifest.model_copy(update=claims)
    body = manifest.model_dump_json().encode()
    return MAGIC + struct.pack("<I", len(body)) + body + artifact.program


def _square() -> jax.Array:
    return jnp.ones((N, N), jnp.float32)


def layernorm_gelu(x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return jax.nn.gelu((x - mean) / jnp.sqrt(var + 1e-5))


def test_a_fused_elementwise_chain_reads_and_writes_its_arrays_about_once() -> None:
    x = jnp.ones((1024, 1024), jnp.float32)  # 4 MiB
    artifact = package(layernorm_gelu, x)
    assert artifact.bytes <= 8 * x.nbytes  # in, out, and passes for the statistics
    unfused = jax.jit(layernorm_gelu).lower(x).cost_analysis()
    assert unfused is not None
    assert artifact.bytes < unfused["bytes accessed"] / 4  # what the old model counted


def test_a_loop_counts_as_often_as_it_runs() -> None:
    def loop(x: jax.Array, w: jax.Array) -> Any:
        return lax.fori_loop(0, 50, lambda i, s: jnp.tanh(s @ w), x)

    artifact = package(loop, _square(), _square())
    assert artifact.flops == pytest.approx(50 * MATMUL, rel=0.05)


def test_a_scan_counts_each_step() -> None:
    def rnn(w: jax.Array, xs: jax.Array) -> jax.Array:
        def cell(h: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
            h = jnp.tanh(h @ w + x)
            return h, h

        return lax.scan(cell, jnp.zeros(xs.shape[1:]), xs)[0]

    artifact = package(rnn, _square(), jnp.ones((30, N, N), jnp.float32))
    assert artifact.flops == pytest.approx(30 * MATMUL, rel=0.05)


def test_nested_loops_multiply_through_calls() -> None:
    """The inner loop sits in a function the outer loop's body calls."""

    def nested(x: jax.Array, w: jax.Array) -> Any:
        inner = jax.jit(lambda s: lax.fori_loop(0, 5, lambda j, t: jnp.tanh(t @ w), s))
        return lax.fori_loop(0, 10, lambda i, s: inner(s), x)

    artifact = package(nested, _square(), _square())
    assert artifact.flops == pytest.approx(50 * MATMUL, rel=0.05)


def test_a_loop_of_unknown_length_counts_once() -> None:
    def until(x: jax.Array) -> jax.Array:
        return lax.while_loop(lambda s: s.sum() < 1e6, lambda s: s @ s + 1.0, x)

    artifact = package(until, _square())
    assert artifact.flops == pytest.approx(MATMUL, rel=0.05)


def test_an_earlier_manifest_that_claims_more_work_is_accepted() -> None:
    """Manifests made with the unoptimized module's analysis stay valid where
    they claim no less than the program does (a fused chain: they claim more)."""
    x = jnp.ones((512, 512), jnp.float32)
    artifact = package(layernorm_gelu, x)
    before = jax.jit(layernorm_gelu).lower(x).cost_analysis()
    assert before is not None
    old = _rebuild(artifact, flops=before["flops"], bytes=before["bytes accessed"])
    verify_artifact(old)


def test_an_earlier_manifest_that_claims_less_work_is_refused() -> None:
    """A loop counted once would make its job look cheap: refused."""

    def loop(x: jax.Array, w: jax.Array) -> Any:
        return lax.fori_loop(0, 50, lambda i, s: jnp.tanh(s @ w), x)

    artifact = package(loop, _square(), _square())
    before = jax.jit(loop).lower(_square(), _square()).cost_analysis()
    assert before is not None
    old = _rebuild(artifact, flops=before["flops"], bytes=before["bytes accessed"])
    with pytest.raises(ArtifactError, match="flops"):
        verify_artifact(old)
