"""Which native routines (StableHLO custom calls) a program may call, per platform.

A custom call names native code that the runtime already has, so it cannot carry
code of its own, but it can reach any routine the runtime registered. Only the
routines JAX itself emits for linear algebra and random numbers are allowed;
Pallas/Triton/Mosaic kernels, TensorFlow calls and anything unknown are refused.
Packaging (``artifact``) and the broker's checks (``checks``) both apply it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from broker.portable import routines
from broker.portable.manifest import ALL_PLATFORMS, ArtifactError

# Annotations XLA understands on every platform; none runs code of its own.
_ANY_PLATFORM = routines.ANNOTATIONS
_LAPACK = (
    *("potrf", "geqrf", "orgqr", "ungqr", "syevd", "heevd", "geev", "gesdd", "getrf"),
    *("sytrd", "hetrd", "gehrd", "gees", "trsm", "gtsv"),
)
_SOLVER = ("getrf", "geqrf", "orgqr", "potrf", "syevd", "gesvd", "gesvdj", "sytrd")

_NAMED: dict[str, frozenset[str]] = {
    "cpu": frozenset(f"lapack_{t}{r}_ffi" for t in "sdcz" for r in _LAPACK),
    "cuda": frozenset(
        {f"cusolver_{r}_ffi" for r in _SOLVER}
        | {"cu_lu_pivots_to_permutation", "cusparse_gtsv2_ffi", "cu_threefry2x32_ffi"}
    ),
    "rocm": frozenset(
        {f"hipsolver_{r}_ffi" for r in (*_SOLVER, "gesdd")}
        | {"hip_lu_pivots_to_permutation", "hip_threefry2x32_ffi"}
    ),
    "tpu": frozenset(
        {
            "Eigh",
            "Qr",
            "ProductOfElementaryHouseholderReflectors",
            "LuDecomposition",
            "ApproxTopK",
            "stablehlo.dynamic_approx_top_k",
        }
    ),
}
# A routine is allowed only where the broker checks its calls against its contract
# (broker.portable.routines): the others are refused by name.
ALLOWED_CUSTOM_CALLS: dict[str, frozenset[str]] = {
    platform: frozenset(t for t in targets if routines.has_contract(t))
    for platform, targets in _NAMED.items()
}


def check_custom_calls(targets: Iterable[str], platforms: Sequence[str]) -> None:
    """ArtifactError unless every target is allowed on one of ``platforms``."""
    for target in sorted(targets):
        if target in _ANY_PLATFORM:
            continue
        homes = [p for p in ALL_PLATFORMS if target in ALLOWED_CUSTOM_CALLS[p]]
        if not homes:
            raise ArtifactError(
                f"the program calls native routine {target!r}, which the broker does not "
                "allow (only the linear-algebra and random-number routines JAX itself "
                "emits are; custom kernels cannot run on a shared marketplace)"
            )
        if not set(homes) & set(platforms):
            raise ArtifactError(
                f"the program calls {target!r}, a {'/'.join(homes)} routine, but is "
                f"exported only for {', '.join(platforms)}"
            )
