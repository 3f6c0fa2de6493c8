"""The runner: compile for the local backend, run, checkpoint, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from broker.portable import runner
from broker.portable.artifact import package, package_step
from tests.broker.portable.programs import mlp, mlp_args, plain_steps, sgd_args, sgd_step


def test_runs_a_function_and_returns_flat_outputs() -> None:
    params, x = mlp_args()
    artifact = package(mlp, params, x)
    result = runner.run(artifact, jax.tree.leaves((params, x)))
    assert result.platform == "cpu"
    assert result.steps_done == 1
    want = jax.tree.leaves(mlp(params, x))
    for got, expected in zip(result.outputs, want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert result.timings.compile > 0
    assert result.timings.run > 0


def test_an_artifact_without_the_local_platform_is_refused() -> None:
    artifact = package(jnp.sin, jnp.ones(3), platforms=("cuda", "tpu"))
    with pytest.raises(runner.RunError, match="runs cpu, but the artifact was exported only"):
        runner.run(artifact, [np.ones(3, np.float32)])


def test_iterative_job_checkpoints_and_resumes_to_the_same_result() -> None:
    state, x, y = sgd_args()
    artifact = package_step(sgd_step, state, x, y)
    leaves = jax.tree.leaves((state, x, y))
    saved: dict[int, list[Any]] = {}
    progress: list[int] = []
    full = runner.run(
        artifact,
        leaves,
        steps=12,
        checkpoint_every=4,
        on_checkpoint=lambda step, st: saved.__setitem__(step, st),
        on_progress=progress.append,
    )
    assert sorted(saved) == [4, 8]
    assert progress == list(range(1, 13))
    assert full.timings.checkpoints == 2

    # Interrupted after step 8: resume from that checkpoint.
    resumed = runner.run(artifact, leaves, steps=12, checkpoint=runner.Checkpoint(8, saved[8]))
    assert resumed.steps_done == 12
    assert resumed.timings.checkpoint_restore > 0
    plain = jax.tree.leaves(plain_steps(12))
    for a, b, c in zip(full.outputs, resumed.outputs, plain, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-6)
        np.testing.assert_allclose(b, c, rtol=1e-6)


def test_should_stop_is_asked_between_steps() -> None:
    state, x, y = sgd_args()
    artifact = package_step(sgd_step, state, x, y)
    done: list[int] = []
    with pytest.raises(runner.Stopped, match="after 3 of 10 steps"):
        runner.run(
            artifact,
            jax.tree.leaves((state, x, y)),
            steps=10,
            on_progress=done.append,
            should_stop=lambda: len(done) >= 3,
        )


def test_a_checkpoint_of_the_wrong_shape_is_refused() -> None:
    state, x, y = sgd_args()
    artifact = package_step(sgd_step, state, x, y)
    bad = runner.Checkpoint(2, [np.zeros((8, 4), np.float64), np.asarray(2, np.int32)])
    with pytest.raises(ValueError, match="checkpoint leaf 0"):
        runner.run(artifact, jax.tree.leaves((state, x, y)), steps=4, checkpoint=bad)


def test_persistent_compilation_cache_is_used(tmp_path: Path) -> None:
    runner.enable_compilation_cache(tmp_path / "cache")
    try:
        artifact = package(lambda a: jnp.cumsum(a * 3.0), jnp.ones(7))
        runner.run(artifact, [np.ones(7, np.float32)])
        assert any((tmp_path / "cache").iterdir())
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        runner._cache_dir = None
