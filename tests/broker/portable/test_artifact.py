"""Packaging: one artifact for every backend, checked by the broker before it is accepted."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from broker.portable import arrays
from broker.portable.artifact import Artifact, ArtifactError, package, package_step
from broker.portable.checks import check_inputs, verify_artifact
from broker.portable.manifest import ALL_PLATFORMS, MAGIC, Manifest
from tests.broker.portable.programs import mlp, mlp_args, sgd_args, sgd_step


def test_exports_for_all_four_platforms_on_a_cpu_only_machine() -> None:
    params, x = mlp_args()
    artifact = package(mlp, params, x)
    assert artifact.platforms == ("cpu", "cuda", "rocm", "tpu")
    assert artifact.exported.platforms == ("cpu", "cuda", "rocm", "tpu")
    manifest = artifact.manifest
    assert manifest.kind == "function"
    assert manifest.devices == 1
    assert manifest.inputs[-1].shape == [8, 16]
    assert manifest.inputs[-1].dtype == "float32"
    assert [o.shape for o in manifest.outputs] == [[8, 16], []]  # dict leaves: out, sum
    assert manifest.jax_version == jax.__version__
    assert manifest.custom_calls == []
    # XLA's cost analysis of the program: at least the two 8x16x16 matmuls.
    assert artifact.flops >= 2 * 2 * 8 * 16 * 16
    assert artifact.bytes > 0
    assert artifact.dtype == "fp32"
    # The broker's own check agrees with the manifest.
    assert verify_artifact(artifact.to_bytes()).sha256 == artifact.sha256


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_running_the_artifact_equals_plain_jax(dtype: object) -> None:
    params, x = mlp_args(dtype)
    artifact = Artifact.from_bytes(package(mlp, params, x).to_bytes())
    got, want = artifact(params, x), jax.jit(mlp)(params, x)
    assert got["out"].dtype == want["out"].dtype == dtype
    np.testing.assert_array_equal(np.asarray(got["out"]), np.asarray(want["out"]))
    assert artifact.dtype == ("bf16" if dtype == jnp.bfloat16 else "fp32")


def test_shape_polymorphic_batch_dimension() -> None:
    params, x = mlp_args(batch=8)
    artifact = package(mlp, params, x, polymorphic_shapes=(None, "b, ..."))
    assert artifact.manifest.polymorphic
    assert artifact.manifest.inputs[-1].shape == ["b", 16]
    verified = verify_artifact(artifact.to_bytes())
    for batch in (1, 5, 32):
        _, xb = mlp_args(batch=batch)
        leaves = arrays.read_header(*_bundle(params, xb))
        check_inputs(verified, leaves)
        np.testing.assert_allclose(verified(params, xb)["out"], mlp(params, xb)["out"], rtol=1e-6)
    _, wrong = mlp_args(batch=3)
    with pytest.raises(ArtifactError, match=r"do not fit.*shape\[1\]"):
        check_inputs(verified, arrays.read_header(*_bundle(params, wrong[:, :5])))


def _bundle(*args: object) -> tuple[bytes, int]:
    data = arrays.encode(jax.tree.leaves(args))
    return data, len(data)


def test_inputs_must_match_the_artifact() -> None:
    params, x = mlp_args()
    artifact = package(mlp, params, x)
    with pytest.raises(ArtifactError, match="takes 5 input arrays; got 4"):
        check_inputs(artifact, arrays.read_header(*_bundle(params[0], params[1][0], x)))
    with pytest.raises(ArtifactError, match="input 4 must be float32"):
        check_inputs(artifact, arrays.read_header(*_bundle(params, x.astype(jnp.int32))))
    with pytest.raises(ArtifactError, match="do not fit"):
        check_inputs(artifact, arrays.read_header(*_bundle(params, x[:3])))


def test_the_cost_is_xla_cost_analysis_of_the_program() -> None:
    """Of the program as XLA optimizes it (compiled), not as written."""
    params, x = mlp_args()
    artifact = package(mlp, params, x)
    compiled = jax.jit(mlp).lower(params, x).compile().cost_analysis()
    assert compiled is not None
    assert artifact.flops == pytest.approx(compiled["flops"], rel=0.01)
    assert artifact.bytes == pytest.approx(compiled["bytes accessed"], rel=0.01)


def test_only_identical_platform_branches_are_merged_for_the_cost() -> None:
    from jax._src.lib import _jax  # type: ignore[attr-defined]
    from jax.interpreters import mlir

    from broker.portable import _xla

    def fn(x: jax.Array) -> Any:
        return jax.lax.platform_dependent(x, cpu=jnp.sin, default=jnp.cos) @ x

    artifact = package(fn, jnp.ones((4, 4)))
    with mlir.make_ir_context():
        module = _jax.mlir.deserialize_portable_artifact(artifact.exported.mlir_module_serialized)
        before = str(module)
        left = _xla._merge_identical_branches(_xla._scan(module.operation)[1])
        merged = str(module)
        _xla._drop_unused_cases(left)
        after = str(module)
    # The matmul lowers alike on every platform: its case goes, and then the case
    # that picked its lowering rule by platform, left unused. sin-or-cos stays.
    assert before.count("stablehlo.dot_general") > 1
    assert after.count("stablehlo.dot_general") == 1
    assert "stablehlo.sine" in after
    assert "stablehlo.cosine" in after
    assert merged.count("stablehlo.case") == before.count("stablehlo.case") - 1
    assert after.count("stablehlo.case") == before.count("stablehlo.case") - 2


def test_the_program_is_what_jax_export_makes() -> None:
    """Packaging exports from its own lowering, in that lowering's MLIR context:
    the program is byte for byte what ``jax.export`` makes."""
    params, x = mlp_args()
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, x))
    exported = export.export(jax.jit(mlp), platforms=ALL_PLATFORMS)(*specs)
    assert package(mlp, params, x).program == exported.serialize()
    state, xs, ys = sgd_args()
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (state, xs, ys))
    exported = export.export(jax.jit(sgd_step), platforms=ALL_PLATFORMS)(*specs)
    assert package_step(sgd_step, state, xs, ys).program == exported.serialize()


def test_packaging_builds_one_mlir_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lowering's: the export copies the module into it (a context with JAX's
    dialects costs as much to build as a small program's lowering)."""
    from jax._src.interpreters import mlir as jax_mlir

    params, x = mlp_args()
    package(mlp, params, x)  # installs the export's hook
    made: list[object] = []

    class Counted(jax_mlir.JaxIrContext):  # type: ignore[misc, name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(jax_mlir, "JaxIrContext", Counted)
    artifact = package(lambda p, x: mlp(p, x), params, x)
    assert len(made) == 1
    assert verify_artifact(artifact.to_bytes()).sha256 == artifact.sha256


def test_the_cost_analysis_thread_hands_back_its_error() -> None:
    from broker.portable import _xla

    def fail(message: str) -> None:
        raise RuntimeError(message)

    work = _xla._Background(fail, "no HLO")
    work.start()
    with pytest.raises(RuntimeError, match="no HLO"):
        work.result()
    assert _xla._Background(len, b"abc").result() == 3  # result() starts it too


def test_step_functions_must_return_their_state() -> None:
    state, x, y = sgd_args()
    artifact = package_step(sgd_step, state, x, y)
    assert artifact.kind == "iterative"
    assert artifact.manifest.state_leaves == 2
    assert artifact.manifest.outputs == artifact.manifest.inputs[:2]
    with pytest.raises(ArtifactError, match="must return the new state"):
        package_step(lambda s, x: s[0] + x.sum(), state, x)


def test_unknown_platform_is_refused() -> None:
    with pytest.raises(ArtifactError, match="platforms must be some of"):
        package(jnp.sin, jnp.ones(3), platforms=("metal",))


def _rebuild(artifact: Artifact, **changes: object) -> bytes:
    manifest = artifact.manifest.model_copy(update=changes)
    body = manifest.model_dump_json().encode()
    return MAGIC + struct.pack("<I", len(body)) + body + artifact.program


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"platforms": ["cpu", "cuda"]}, "platforms"),
        ({"flops": 1.0}, "flops"),
        ({"dtype": "bf16"}, "dtype"),
        ({"kind": "iterative", "state_leaves": 1}, "iterative"),
    ],
)
def test_a_manifest_that_lies_is_refused(changes: dict[str, object], message: str) -> None:
    artifact = package(mlp, *mlp_args())
    with pytest.raises(ArtifactError, match=message):
        verify_artifact(_rebuild(artifact, **changes))


def test_tampered_bytes_are_refused() -> None:
    data = bytearray(package(mlp, *mlp_args()).to_bytes())
    data[-10] ^= 0xFF
    with pytest.raises(ArtifactError, match="program_sha256"):
        verify_artifact(bytes(data))
    with pytest.raises(ArtifactError, match="bad magic"):
        verify_artifact(b"GIF89a" + bytes(data))
    with pytest.raises(ArtifactError, match="truncated"):
        verify_artifact(bytes(data[:-100]))


def test_a_program_that_is_not_a_jax_export_is_refused() -> None:
    artifact = package(mlp, *mlp_args())
    junk = b"\x00" * 64
    fake = artifact.manifest.model_copy(
        update={"program_sha256": hashlib.sha256(junk).hexdigest(), "program_size": len(junk)}
    )
    body = fake.model_dump_json().encode()
    with pytest.raises(ArtifactError, match="does not deserialize"):
        verify_artifact(MAGIC + struct.pack("<I", len(body)) + body + junk)


def _with_custom_call(target: str, platforms: tuple[str, ...] = ("cpu",)) -> export.Exported:
    def fn(x: jax.Array) -> jax.Array:
        return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

    checks = [export.DisabledSafetyCheck.custom_call(target)]
    return export.export(jax.jit(fn), platforms=platforms, disabled_checks=checks)(jnp.ones(3))


def _hand_made(exported: export.Exported, custom_calls: list[str]) -> bytes:
    """An artifact built around ``exported`` without package()'s own checks."""
    from broker.portable.artifact import tensor_spec, work_dtype

    program = bytes(exported.serialize())
    manifest = Manifest(
        kind="function",
        program_sha256=hashlib.sha256(program).hexdigest(),
        program_size=len(program),
        platforms=list(exported.platforms),  # type: ignore[arg-type]
        fun_name="evil",
        jax_version=jax.__version__,
        calling_convention_version=exported.calling_convention_version,
        devices=1,
        inputs=[tensor_spec(a) for a in exported.in_avals],
        outputs=[tensor_spec(a) for a in exported.out_avals],
        polymorphic=False,
        flops=0,
        bytes=0,
        dtype=work_dtype(exported.in_avals),
        custom_calls=custom_calls,
    )
    return Artifact(manifest, program).to_bytes()


def test_a_disallowed_custom_call_is_refused() -> None:
    exported = _with_custom_call("my_native_kernel")
    with pytest.raises(ArtifactError, match="does not allow"):
        verify_artifact(_hand_made(exported, ["my_native_kernel"]))
    # Hiding it from the manifest does not help.
    with pytest.raises(ArtifactError, match="custom_calls"):
        verify_artifact(_hand_made(exported, []))


def test_allowed_custom_calls_follow_the_platforms() -> None:
    artifact = package(jnp.linalg.cholesky, jnp.eye(4), platforms=("cpu", "cuda", "rocm"))
    assert artifact.manifest.custom_calls == [
        "cusolver_potrf_ffi",
        "hipsolver_potrf_ffi",
        "lapack_spotrf_ffi",
    ]
    verify_artifact(artifact.to_bytes())
    # A cuSOLVER routine in an artifact that claims to be for cpu only is refused.
    exported = _with_custom_call("cusolver_potrf_ffi")
    with pytest.raises(ArtifactError, match="a cuda routine, but is exported only for cpu"):
        verify_artifact(_hand_made(exported, ["cusolver_potrf_ffi"]))
