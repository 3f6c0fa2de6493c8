"""The runner: compile for the local backend, run, checkpoint, resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from broker.portable import executables, runner
from broker.portable.artifact import Artifact, package, package_step
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
    # Progress follows each chunk of steps; chunks end at checkpoints.
    assert progress == sorted(set(progress))
    assert {4, 8, 12} <= set(progress)
    assert full.timings.checkpoints == 2

    # Interrupted after step 8: resume from that checkpoint.
    resumed = runner.run(artifact, leaves, steps=12, checkpoint=runner.Checkpoint(8, saved[8]))
    assert resumed.steps_done == 12
    assert resumed.timings.checkpoint_restore > 0
    plain = jax.tree.leaves(plain_steps(12))
    for a, b, c in zip(full.outputs, resumed.outputs, plain, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-6)
        np.testing.assert_allclose(b, c, rtol=1e-6)


def test_resuming_from_any_step_gives_the_same_result() -> None:
    state, x, y = sgd_args()
    artifact = package_step(sgd_step, state, x, y)
    leaves = jax.tree.leaves((state, x, y))
    saved: dict[int, list[Any]] = {}
    full = runner.run(
        artifact,
        leaves,
        steps=9,
        checkpoint_every=1,
        on_checkpoint=lambda step, st: saved.__setitem__(step, st),
    )
    assert sorted(saved) == list(range(1, 9))
    for step, state_then in saved.items():
        from_there = runner.Checkpoint(step, state_then)
        resumed = runner.run(artifact, leaves, steps=9, checkpoint=from_there)
        assert resumed.steps_done == 9
        for a, b in zip(full.outputs, resumed.outputs, strict=True):
            np.testing.assert_array_equal(a, b)  # the same executable does every step


def test_should_stop_is_asked_between_chunks() -> None:
    state, x, y = sgd_args()
    artifact = package_step(sgd_step, state, x, y)
    done: list[int] = []
    asked_before: list[int] = []

    def should_stop() -> bool:
        asked_before.append(done[-1] if done else 0)
        return bool(done) and done[-1] >= 3

    with pytest.raises(runner.Stopped) as stopped:
        runner.run(
            artifact,
            jax.tree.leaves((state, x, y)),
            steps=1_000_000,
            on_progress=done.append,
            should_stop=should_stop,
        )
    assert asked_before[0] == 0  # before the first step
    assert 3 <= done[-1] < 1_000_000
    assert str(stopped.value) == f"stopped after {done[-1]} of 1000000 steps"


def test_chunks_grow_to_the_time_budget_and_shrink_when_steps_are_slow() -> None:
    budget = runner.CHUNK_SECONDS
    assert runner._next_chunk(1, budget / 1000) == 8  # at most eightfold
    assert runner._next_chunk(800, budget / 10) == 6400
    assert runner._next_chunk(1000, budget) == 1000  # on budget
    assert runner._next_chunk(1000, budget * 10) == 100
    assert runner._next_chunk(1, budget * 10) == 1  # never below one step


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


def test_a_fresh_process_loads_the_compiled_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state, x, y = sgd_args()
    artifact = package_step(sgd_step, state, x, y)
    leaves = jax.tree.leaves((state, x, y))
    monkeypatch.setattr(runner, "_cache_dir", tmp_path)
    executables.clear_memory()  # compiled by an earlier test, without a cache directory
    first = runner.run(artifact, leaves, steps=5)
    assert len(list((tmp_path / "broker-executables").iterdir())) == 1

    def no_compiling(*args: object) -> None:
        raise AssertionError("compiled again")

    executables.clear_memory()  # as in a new process
    with monkeypatch.context() as patched:
        patched.setattr(executables, "_compile", no_compiling)
        again = runner.run(Artifact.from_bytes(artifact.to_bytes()), leaves, steps=5)
    for a, b in zip(first.outputs, again.outputs, strict=True):
        np.testing.assert_array_equal(a, b)

    # A torn file is compiled again and replaced.
    for entry in (tmp_path / "broker-executables").iterdir():
        entry.write_bytes(entry.read_bytes()[:100])
    executables.clear_memory()
    torn = runner.run(artifact, leaves, steps=5)
    assert all(e.stat().st_size > 100 for e in (tmp_path / "broker-executables").iterdir())
    for a, b in zip(first.outputs, torn.outputs, strict=True):
        np.testing.assert_array_equal(a, b)


_FRESH_PROCESS = """
import sys
from pathlib import Path

import jax
import numpy as np

cache = Path(sys.argv[1])
jax.config.update("jax_compilation_cache_dir", str(cache))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
from broker.portable import runner
from broker.portable.artifact import Artifact
from tests.broker.portable.programs import sgd_args

if sys.argv[3] == "runner":
    runner._cache_dir = cache
artifact = Artifact.from_bytes(Path(sys.argv[2]).read_bytes())
result = runner.run(artifact, jax.tree.leaves(sgd_args()), steps=7)
print(float(np.sum(result.outputs[0])))
"""


def test_fresh_processes_run_programs_from_both_caches(tmp_path: Path) -> None:
    state, x, y = sgd_args()
    artifact_file = tmp_path / "step.artifact"
    artifact_file.write_bytes(package_step(sgd_step, state, x, y).to_bytes())
    root = Path(__file__).resolve().parents[3]

    def fresh(cache: Path, whose: str) -> float:
        done = subprocess.run(
            [sys.executable, "-c", _FRESH_PROCESS, str(cache), str(artifact_file), whose],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return float(done.stdout.split()[-1])

    want = float(np.sum(jax.tree.leaves(plain_steps(7))[0]))
    # JAX's cache holds the program (a run without the runner's cache): the runner
    # uses that entry, but keeps no copy of it (XLA:CPU's copy would not run elsewhere).
    shared = tmp_path / "shared"
    results = [fresh(shared, "jax"), fresh(shared, "runner"), fresh(shared, "runner")]
    assert not list(shared.glob("broker-executables/*.bin"))
    # A cache of its own: compiled once, then loaded by the next process.
    own = tmp_path / "own"
    results += [fresh(own, "runner"), fresh(own, "runner")]
    assert len(list(own.glob("broker-executables/*.bin"))) == 1
    assert not list(own.glob("jit_steps*"))  # no second copy in JAX's cache
    np.testing.assert_allclose(results, want, rtol=1e-5)


def test_cached_programs_know_when_cpu_linear_algebra_must_be_loaded() -> None:
    assert executables._uses_lapack(package(jnp.linalg.cholesky, jnp.eye(4)))
    assert not executables._uses_lapack(package(jnp.sin, jnp.ones(3)))


def test_a_cache_directory_that_cannot_be_written_only_costs_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_bytes(b"")
    monkeypatch.setattr(runner, "_cache_dir", blocked)
    executables.clear_memory()
    artifact = package(jnp.sin, jnp.ones(3))
    result = runner.run(artifact, [np.ones(3, np.float32)])
    np.testing.assert_allclose(result.outputs[0], np.sin(np.ones(3)), rtol=1e-6)
