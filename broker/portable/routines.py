"""The contracts of the native routines (custom calls) the broker allows.

A native routine trusts its caller: LAPACK's ``getrf`` reads the matrix's size
from its operand and writes that many pivots into its result, whatever size the
result was declared with. A program that calls it with a 256x256 matrix and a
1x1 result makes it write far past a buffer. So each allowed routine is allowed
only with operands and results whose shapes and element types are exactly what
JAX's own lowering gives for its operands (read from the program, never from
the manifest); a routine without such a contract here is not allowed at all.

The shapes follow JAX's FFI routines (jaxlib ``lapack_*_ffi`` on the CPU,
``cusolver_*_ffi`` and ``hipsolver_*_ffi`` on GPUs): a batch of matrices
``B + [m, n]``, ``k = min(m, n)``, status (``info``) arrays ``B`` of int32.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.portable.manifest import ArtifactError


@dataclass(frozen=True)
class Tensor:
    """One operand or result: its static shape (None: not static) and element type."""

    shape: tuple[int, ...] | None
    dtype: str  # MLIR's spelling: f32, f64, complex<f32>, i32, ui32, ...

    def __str__(self) -> str:
        dims = "x".join(str(d) for d in self.shape) if self.shape is not None else "?"
        return f"{dims}x{self.dtype}" if self.shape else f"{self.dtype}"


@dataclass(frozen=True)
class CallSite:
    """One custom call in a program, as the program has it."""

    target: str
    operands: tuple[Tensor, ...]
    results: tuple[Tensor, ...]
    config: dict[str, Any] = field(default_factory=dict)  # backend_config entries


_REAL = {"f32": "f32", "f64": "f64", "complex<f32>": "f32", "complex<f64>": "f64"}
_COMPLEX = {"f32": "complex<f32>", "f64": "complex<f64>"}
_LAPACK_TYPE = {"s": "f32", "d": "f64", "c": "complex<f32>", "z": "complex<f64>"}
I32 = "i32"


class _Mismatch(Exception):
    pass


def _matrix(x: Tensor) -> tuple[tuple[int, ...], int, int]:
    assert x.shape is not None
    if len(x.shape) < 2:
        raise _Mismatch(f"operand {x} is not a batch of matrices")
    return x.shape[:-2], x.shape[-2], x.shape[-1]


def _expect(site: CallSite, results: Sequence[tuple[tuple[int, ...], str]]) -> None:
    want = tuple(Tensor(tuple(s), t) for s, t in results)
    if site.results != want:
        raise _Mismatch(
            f"for operands ({', '.join(map(str, site.operands))}) its results must be "
            f"({', '.join(map(str, want))}); the program declares "
            f"({', '.join(map(str, site.results))})"
        )


def _operands(site: CallSite, count: int, dtype: str | None) -> tuple[Tensor, ...]:
    if len(site.operands) != count:
        raise _Mismatch(f"it takes {count} operand(s); the program passes {len(site.operands)}")
    if dtype is not None and site.operands[0].dtype != dtype:
        raise _Mismatch(f"its operand must be {dtype}; the program passes {site.operands[0]}")
    if site.operands[0].dtype not in _REAL:
        raise _Mismatch(f"its operand must be a float or complex matrix, not {site.operands[0]}")
    return site.operands


def _getrf(site: CallSite, t: str | None) -> None:
    (a,) = _operands(site, 1, t)
    b, m, n = _matrix(a)
    _expect(site, [((*b, m, n), a.dtype), ((*b, min(m, n)), I32), (b, I32)])


def _potrf(site: CallSite, t: str | None) -> None:
    (a,) = _operands(site, 1, t)
    b, m, n = _matrix(a)
    if m != n:
        raise _Mismatch(f"its operand must be square; the program passes {a}")
    _expect(site, [((*b, n, n), a.dtype), (b, I32)])


def _geqrf(site: CallSite, t: str | None) -> None:
    (a,) = _operands(site, 1, t)
    b, m, n = _matrix(a)
    _expect(site, [((*b, m, n), a.dtype), ((*b, min(m, n)), a.dtype)])


def _orgqr(site: CallSite, t: str | None) -> None:
    a, tau = _operands(site, 2, t)
    b, m, n = _matrix(a)
    if tau.dtype != a.dtype or tau.shape is None or tau.shape[:-1] != b or not tau.shape:
        raise _Mismatch(f"its second operand must be {a.dtype} of shape {b} + [k]; got {tau}")
    if not (tau.shape[-1] <= n <= m):
        raise _Mismatch(f"it needs k <= n <= m; the program passes {a} and {tau}")
    _expect(site, [((*b, m, n), a.dtype)])


def _syevd(site: CallSite, t: str | None) -> None:
    (a,) = _operands(site, 1, t)
    b, m, n = _matrix(a)
    if m != n:
        raise _Mismatch(f"its operand must be square; the program passes {a}")
    _expect(site, [((*b, n, n), a.dtype), ((*b, n), _REAL[a.dtype]), (b, I32)])


def _trsm(site: CallSite, t: str | None) -> None:
    a, x = _operands(site, 2, t)
    b, p, q = _matrix(a)
    bx, m, n = _matrix(x)
    side = site.config.get("side")
    if side not in (ord("L"), ord("R")):
        raise _Mismatch(f"its side must be L or R; the program says {side!r}")
    if x.dtype != a.dtype or bx != b or p != q or p != (m if side == ord("L") else n):
        raise _Mismatch(
            f"a triangular solve needs a square matrix matching the right-hand side's "
            f"{'rows' if side == ord('L') else 'columns'}; the program passes {a} and {x}"
        )
    _expect(site, [((*b, m, n), a.dtype)])


def _svd_results(site: CallSite, a: Tensor, u: tuple[int, int], vt: tuple[int, int]) -> None:
    b, m, n = _matrix(a)
    _expect(
        site,
        [
            ((*b, m, n), a.dtype),
            ((*b, min(m, n)), _REAL[a.dtype]),
            ((*b, *u), a.dtype),
            ((*b, *vt), a.dtype),
            (b, I32),
        ],
    )


def _gesdd(site: CallSite, t: str | None) -> None:
    (a,) = _operands(site, 1, t)
    _, m, n = _matrix(a)
    k = min(m, n)
    mode = site.config.get("mode")
    if mode not in (ord("A"), ord("N"), ord("S")):
        raise _Mismatch(f"its mode must be A, S or N; the program says {mode!r}")
    full = mode != ord("S")
    _svd_results(site, a, (m, m) if full else (m, k), (n, n) if full else (k, n))


def _full_matrices(site: CallSite) -> bool:
    full = site.config.get("full_matrices")
    if not isinstance(full, bool):
        raise _Mismatch("it needs a full_matrices attribute")
    return full


def _gesvdj(site: CallSite, t: str | None) -> None:
    (a,) = _operands(site, 1, t)
    _, m, n = _matrix(a)
    k = min(m, n)
    full = _full_matrices(site)  # economy: V (n x k), not its transpose
    _svd_results(site, a, (m, m) if full else (m, k), (n, n) if full else (n, k))


def _gesvd(site: CallSite, t: str | None) -> None:
    (a,) = _operands(site, 1, t)
    _, m, n = _matrix(a)
    k = min(m, n)
    full = _full_matrices(site)
    transposed = site.config.get("transposed", False)
    if not isinstance(transposed, bool):
        raise _Mismatch("its transposed attribute must be true or false")
    if transposed:  # computed on the transpose: U and V^T come back transposed
        _svd_results(site, a, (n, n) if full else (k, n), (m, m) if full else (m, k))
    else:
        _svd_results(site, a, (m, m) if full else (m, k), (n, n) if full else (k, n))


def _pivots_to_permutation(site: CallSite, t: str | None) -> None:
    if len(site.operands) != 1 or len(site.results) != 1:
        raise _Mismatch("it takes one array of pivots and returns one permutation")
    (pivots,), (perm,) = site.operands, site.results
    assert pivots.shape is not None
    assert perm.shape is not None
    if (
        pivots.dtype != I32
        or perm.dtype != I32
        or not pivots.shape
        or not perm.shape
        or pivots.shape[:-1] != perm.shape[:-1]
        or pivots.shape[-1] > perm.shape[-1]
    ):
        raise _Mismatch(
            f"pivots B + [k] and a permutation B + [n >= k], both int32; the program has "
            f"{pivots} -> {perm}"
        )


def _geev(site: CallSite, t: str | None) -> None:
    (a,) = _operands(site, 1, t)
    b, m, n = _matrix(a)
    if m != n:
        raise _Mismatch(f"its operand must be square; the program passes {a}")
    if a.dtype in _COMPLEX:  # real matrices: eigenvalues as real and imaginary parts
        c = _COMPLEX[a.dtype]
        _expect(
            site,
            [((*b, n), a.dtype), ((*b, n), a.dtype), ((*b, n, n), c), ((*b, n, n), c), (b, I32)],
        )
    else:
        _expect(site, [((*b, n), a.dtype), ((*b, n, n), a.dtype), ((*b, n, n), a.dtype), (b, I32)])


def _threefry(site: CallSite, t: str | None) -> None:
    tensors = (*site.operands, *site.results)
    if len(site.operands) != 4 or len(site.results) != 2:
        raise _Mismatch("it takes 4 operands (two key words, two data words) and returns 2")
    if any(x.dtype != "ui32" or x.shape != tensors[0].shape for x in tensors):
        raise _Mismatch(
            "its operands and results must all be uint32 arrays of one shape; the program "
            f"has ({', '.join(map(str, site.operands))}) -> "
            f"({', '.join(map(str, site.results))})"
        )


Contract = Callable[[CallSite, "str | None"], None]

# Per routine, its contract; the element type comes from the name's LAPACK letter
# on the CPU, and from the operand on GPUs.
_CPU: dict[str, Contract] = {
    "getrf": _getrf,
    "potrf": _potrf,
    "geqrf": _geqrf,
    "orgqr": _orgqr,
    "ungqr": _orgqr,
    "syevd": _syevd,
    "heevd": _syevd,
    "trsm": _trsm,
    "gesdd": _gesdd,
    "geev": _geev,
}
_GPU: dict[str, Contract] = {
    "getrf": _getrf,
    "potrf": _potrf,
    "geqrf": _geqrf,
    "orgqr": _orgqr,
    "syevd": _syevd,
    "gesvd": _gesvd,
    "gesvdj": _gesvdj,
}
# Annotations XLA understands on every platform; none runs code of its own.
ANNOTATIONS = frozenset(
    {
        "Sharding",
        "SPMDFullToShardShape",
        "SPMDShardToFullShape",
        "annotate_device_placement",
        "shape_assertion",  # shape-polymorphism checks, evaluated by XLA
        "AllocateBuffer",
    }
)
_LAPACK_NAME = re.compile(r"^lapack_([sdcz])([a-z]+)_ffi$")
_GPU_NAME = re.compile(r"^(?:cusolver|hipsolver)_([a-z]+)_ffi$")
_THREEFRY = {"cu_threefry2x32_ffi", "hip_threefry2x32_ffi"}
_PIVOTS = {"cu_lu_pivots_to_permutation", "hip_lu_pivots_to_permutation"}
# Expanded by XLA's own compiler on TPUs, not native code reading caller-declared buffers.
_XLA_EXPANDED = {
    "Eigh",
    "Qr",
    "ProductOfElementaryHouseholderReflectors",
    "LuDecomposition",
    "ApproxTopK",
    "stablehlo.dynamic_approx_top_k",
}


def contract_for(target: str) -> tuple[Contract, str | None] | None:
    """The contract of a routine and the element type its name fixes; None: no contract."""
    if target in _THREEFRY:
        return _threefry, None
    if target in _PIVOTS:
        return _pivots_to_permutation, None
    if m := _LAPACK_NAME.match(target):
        contract = _CPU.get(m.group(2))
        return (contract, _LAPACK_TYPE[m.group(1)]) if contract else None
    if m := _GPU_NAME.match(target):
        contract = _GPU.get(m.group(1))
        return (contract, None) if contract else None
    return None


def has_contract(target: str) -> bool:
    return target in _XLA_EXPANDED or contract_for(target) is not None


def check_call_sites(sites: Sequence[CallSite]) -> None:
    """ArtifactError unless every call of a native routine keeps the routine's contract."""
    for site in sites:
        if site.target in _XLA_EXPANDED or site.target in ANNOTATIONS:
            continue
        found = contract_for(site.target)
        if found is None:
            raise ArtifactError(
                f"the program calls native routine {site.target!r}, whose operands the broker "
                "cannot check, so it is not allowed"
            )
        contract, dtype = found
        tensors = (*site.operands, *site.results)
        if any(x.shape is None for x in tensors):
            raise ArtifactError(
                f"the program calls {site.target!r} with shapes that are not static; native "
                "routines are allowed only on arrays of known shape"
            )
        try:
            contract(site, dtype)
        except _Mismatch as e:
            raise ArtifactError(
                f"the program calls native routine {site.target!r} against its contract: {e}"
            ) from None
