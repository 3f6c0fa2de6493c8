"""Hostile artifacts, built here, that the broker's checks refuse (at upload, and again
on the agent, which runs the same checks): native routines called against their
contracts, routines without one, and manifests that lie about the program."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from broker.portable.artifact import Artifact, package
from broker.portable.checks import verify_artifact
from broker.portable.custom_calls import ALLOWED_CUSTOM_CALLS
from broker.portable.manifest import MAGIC, ArtifactError, Manifest, TensorSpec
from broker.portable.routines import CallSite, Tensor, check_call_sites
from tests.broker.portable.programs import mlp, mlp_args


def _calling(target: str, results: Any, *args: Any, **config: Any) -> export.Exported:
    """A program that calls native routine ``target`` on ``args`` with the results it
    declares: what a hand-written module, not JAX's lowering, can say."""

    def fn(*xs: jax.Array) -> Any:
        return jax.ffi.ffi_call(target, results)(*xs, **config)

    checks = [export.DisabledSafetyCheck.custom_call(target)]
    return export.export(jax.jit(fn), platforms=("cpu",), disabled_checks=checks)(*args)


def _artifact(exported: export.Exported, **claims: Any) -> bytes:
    """An artifact around ``exported`` whose manifest says what the program is, except
    for ``claims``."""
    from broker.portable import _xla
    from broker.portable.artifact import tensor_spec, work_dtype

    program = bytes(exported.serialize())
    targets, _, cost = _xla.inspect_program(exported, with_cost=True)
    assert cost is not None
    fields: dict[str, Any] = {
        "kind": "function",
        "program_sha256": hashlib.sha256(program).hexdigest(),
        "program_size": len(program),
        "platforms": list(exported.platforms),
        "fun_name": "hostile",
        "jax_version": jax.__version__,
        "calling_convention_version": exported.calling_convention_version,
        "devices": 1,
        "inputs": [tensor_spec(a) for a in exported.in_avals],
        "outputs": [tensor_spec(a) for a in exported.out_avals],
        "polymorphic": False,
        "flops": cost["flops"],
        "bytes": cost["bytes"],
        "dtype": work_dtype(exported.in_avals),
        "custom_calls": targets,
    }
    fields.update(claims)
    return Artifact(Manifest(**fields), program).to_bytes()


def getrf_declaring_a_1x1_result() -> bytes:
    """The review's case: LU of a 256x256 matrix into a 1x1 result (it would write
    about 256 KiB past the buffer)."""
    results = (
        jax.ShapeDtypeStruct((1, 1), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    return _artifact(_calling("lapack_sgetrf_ffi", results, jnp.ones((256, 256))))


def test_a_native_routine_called_against_its_contract_is_refused() -> None:
    with pytest.raises(ArtifactError, match=r"lapack_sgetrf_ffi.*against its contract.*256x256"):
        verify_artifact(getrf_declaring_a_1x1_result())


def test_the_same_routine_called_as_jax_calls_it_is_allowed() -> None:
    artifact = package(jax.scipy.linalg.lu_factor, jnp.eye(4) + 1, platforms=("cpu", "cuda"))
    assert {"lapack_sgetrf_ffi", "cusolver_getrf_ffi"} <= set(artifact.manifest.custom_calls)
    verify_artifact(artifact.to_bytes())
    # And well-formed: the right result shapes, through the hand-made path too.
    results = (
        jax.ShapeDtypeStruct((4, 4), jnp.float32),
        jax.ShapeDtypeStruct((4,), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    verify_artifact(_artifact(_calling("lapack_sgetrf_ffi", results, jnp.ones((4, 4)))))


@pytest.mark.parametrize(
    ("target", "results", "args", "config", "message"),
    [
        # A result typed as another element type than the routine writes.
        (
            "lapack_spotrf_ffi",
            (jax.ShapeDtypeStruct((8, 8), jnp.int8), jax.ShapeDtypeStruct((), jnp.int32)),
            (jnp.eye(8),),
            {"uplo": ord("L")},
            "against its contract",
        ),
        # A non-square matrix for a routine that needs a square one.
        (
            "lapack_ssyevd_ffi",
            (
                jax.ShapeDtypeStruct((8, 4), jnp.float32),
                jax.ShapeDtypeStruct((8,), jnp.float32),
                jax.ShapeDtypeStruct((), jnp.int32),
            ),
            (jnp.ones((8, 4)),),
            {"mode": ord("V"), "uplo": ord("L")},
            "must be square",
        ),
        # Full U and V^T asked for (mode A) into economy-sized results.
        (
            "lapack_sgesdd_ffi",
            (
                jax.ShapeDtypeStruct((6, 3), jnp.float32),
                jax.ShapeDtypeStruct((3,), jnp.float32),
                jax.ShapeDtypeStruct((6, 3), jnp.float32),
                jax.ShapeDtypeStruct((3, 3), jnp.float32),
                jax.ShapeDtypeStruct((), jnp.int32),
            ),
            (jnp.ones((6, 3)),),
            {"mode": ord("A")},
            "against its contract",
        ),
        # The right shapes under a routine the broker has no contract for.
        (
            "lapack_sgehrd_ffi",
            (jax.ShapeDtypeStruct((4, 4), jnp.float32),),
            (jnp.ones((4, 4)),),
            {},
            "does not allow",
        ),
        # A triangular solve whose matrix does not match the right-hand side.
        (
            "lapack_strsm_ffi",
            (jax.ShapeDtypeStruct((4, 2), jnp.float32),),
            (jnp.eye(16), jnp.ones((4, 2))),
            {"side": ord("L"), "uplo": ord("L"), "trans_x": ord("N"), "diag": ord("N")},
            "triangular solve",
        ),
    ],
)
def test_native_routines_keep_their_contracts(
    target: str, results: Any, args: Any, config: dict[str, Any], message: str
) -> None:
    config = {k: np.uint8(v) for k, v in config.items()}
    with pytest.raises(ArtifactError, match=message):
        verify_artifact(_artifact(_calling(target, results, *args, **config)))


def test_only_routines_with_a_contract_are_allowed() -> None:
    assert "lapack_sgetrf_ffi" in ALLOWED_CUSTOM_CALLS["cpu"]
    assert "lapack_sgehrd_ffi" not in ALLOWED_CUSTOM_CALLS["cpu"]
    assert "cusparse_gtsv2_ffi" not in ALLOWED_CUSTOM_CALLS["cuda"]
    # Shapes that are not static cannot be checked against a contract.
    site = CallSite("lapack_spotrf_ffi", (Tensor(None, "f32"),), (Tensor(None, "f32"),))
    with pytest.raises(ArtifactError, match="not static"):
        check_call_sites([site])


def test_linear_algebra_as_jax_lowers_it_passes_on_every_platform() -> None:
    """The contracts are those of JAX's own lowering, for each platform's routines."""

    def algebra(a: jax.Array) -> Any:
        q, r = jnp.linalg.qr(a[:, :3])
        u, s, vt = jnp.linalg.svd(a[:5, :3], full_matrices=False)
        w, v = jnp.linalg.eigh(a @ a.T)
        return q, r, u, s, vt, w, v, jnp.linalg.inv(a), jnp.linalg.cholesky(a @ a.T)

    x = jnp.eye(6) * 2 + 0.1
    artifact = package(algebra, x, platforms=("cpu", "cuda", "rocm", "tpu"))
    assert {"lapack_sgesdd_ffi", "cusolver_gesvdj_ffi", "hipsolver_syevd_ffi"} <= set(
        artifact.manifest.custom_calls
    )
    verify_artifact(artifact.to_bytes())


def _fixed_matmul() -> Artifact:
    return package(lambda a, b: a @ b, jnp.ones((512, 512)), jnp.ones((512, 512)))


def _rebuild(artifact: Artifact, **claims: Any) -> bytes:
    manifest = artifact.manifest.model_copy(update=claims)
    body = manifest.model_dump_json().encode()
    return MAGIC + struct.pack("<I", len(body)) + body + artifact.program


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        # The review's case: a fixed-shape matmul said to be polymorphic, so free.
        ({"polymorphic": True, "flops": 0.0, "bytes": 0.0}, "polymorphic"),
        ({"flops": 0.0}, "flops"),
        ({"bytes": 0.0}, "bytes"),
        ({"dtype": "bf16"}, "dtype"),
        ({"platforms": ["cpu"]}, "platforms"),
        ({"outputs": [TensorSpec(shape=[1], dtype="float32")]}, "outputs"),
        ({"custom_calls": ["lapack_sgetrf_ffi"]}, "custom_calls"),
    ],
)
def test_every_claim_of_the_manifest_is_read_from_the_program(
    claims: dict[str, Any], message: str
) -> None:
    artifact = _fixed_matmul()
    assert artifact.manifest.flops >= 2 * 512**3
    with pytest.raises(ArtifactError, match=message):
        verify_artifact(_rebuild(artifact, **claims))


def test_a_truly_polymorphic_program_is_still_accepted() -> None:
    params, x = mlp_args()
    artifact = package(mlp, params, x, polymorphic_shapes=(None, "b, ..."))
    assert artifact.manifest.polymorphic
    verify_artifact(artifact.to_bytes())
    with pytest.raises(ArtifactError, match="polymorphic"):
        verify_artifact(_rebuild(artifact, polymorphic=False))
    # Its cost cannot be checked at shapes the broker never sees, but it cannot be
    # less than at the smallest shapes the program accepts.
    with pytest.raises(ArtifactError, match=r"flops.*smallest shapes"):
        verify_artifact(_rebuild(artifact, flops=0.0))
