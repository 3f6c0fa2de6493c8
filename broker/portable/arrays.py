"""Array bundles: the wire and storage form of a job's inputs, checkpoints and results.

A bundle is a flat list of arrays (the leaves of a pytree, in JAX's flattening
order; the tree itself travels in the artifact). No pickle: a bundle is a
small JSON header followed by the raw little-endian C-order bytes of each
leaf, so it can be checked without trusting it and read without copying.

    b"BRKARR01" | u32 header length | header JSON | padding | leaf bytes ...

The header is ``{"leaves": [{"dtype": "bfloat16", "shape": [2, 3],
"offset": 0, "nbytes": 12}, ...]}``. The data section starts at the first
64-byte boundary after the header; offsets count from there and are 64-byte
aligned too.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

MAGIC = b"BRKARR01"
_ALIGN = 64
_MAX_HEADER = 16 * 1024 * 1024
_MAX_LEAVES = 100_000
MAX_HEAD = len(MAGIC) + 4 + _MAX_HEADER  # read this much to be sure of having the header
_MAX_RANK = 32

# Every dtype JAX programs exchange; anything else (objects, strings) is refused.
DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(t)
    for name, t in {
        "bool": np.bool_,
        "int8": np.int8,
        "int16": np.int16,
        "int32": np.int32,
        "int64": np.int64,
        "uint8": np.uint8,
        "uint16": np.uint16,
        "uint32": np.uint32,
        "uint64": np.uint64,
        "float16": np.float16,
        "bfloat16": ml_dtypes.bfloat16,
        "float32": np.float32,
        "float64": np.float64,
        "complex64": np.complex64,
        "complex128": np.complex128,
        "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
        "float8_e5m2": ml_dtypes.float8_e5m2,
    }.items()
}


class BundleError(ValueError):
    """The bytes are not a well-formed array bundle."""


@dataclass(frozen=True, slots=True)
class LeafSpec:
    """Shape and dtype of one leaf, and where its bytes are (from the bundle's start)."""

    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}


def dtype_name(dtype: Any) -> str:
    """The bundle's name for a numpy or JAX dtype; BundleError if it cannot travel."""
    name = str(np.dtype(dtype).name)
    if name not in DTYPES:
        raise BundleError(f"arrays of dtype {name} cannot be sent; use a numeric dtype")
    return name


def encode(leaves: Sequence[Any]) -> bytes:
    """A bundle holding ``leaves`` (numpy arrays, JAX arrays or scalars), in order."""
    return b"".join(_parts(leaves))


def write(path: Path, leaves: Sequence[Any]) -> int:
    """Write the bundle of ``leaves`` to ``path`` without building it in memory first
    (a run's results and checkpoints may be gigabytes); returns its size in bytes."""
    size = 0
    with path.open("wb") as f:
        for part in _parts(leaves):
            f.write(part)
            size += len(part)
    return size


def _parts(leaves: Sequence[Any]) -> list[bytes | memoryview]:
    """The bundle's pieces in order: magic, length and header, then each leaf's bytes
    (views of the arrays, not copies, where they are little-endian and C-ordered) with
    the padding that aligns the next one."""
    # np.asarray keeps 0-d leaves 0-d (np.ascontiguousarray would make them 1-d).
    arrays = [np.asarray(leaf) for leaf in leaves]
    specs: list[dict[str, Any]] = []
    size = 0
    for array in arrays:
        offset = _aligned(size)
        specs.append(
            {
                "dtype": dtype_name(array.dtype),
                "shape": list(array.shape),
                "offset": offset,
                "nbytes": array.nbytes,
            }
        )
        size = offset + array.nbytes
    header = json.dumps({"leaves": specs}, separators=(",", ":")).encode()
    head = MAGIC + struct.pack("<I", len(header)) + header
    parts: list[bytes | memoryview] = [head, bytes(_data_start(len(header)) - len(head))]
    at = 0
    for spec, array in zip(specs, arrays, strict=True):
        parts.append(bytes(spec["offset"] - at))
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        if little.ndim:
            little = np.ascontiguousarray(little)
        parts.append(little.reshape(-1).view(np.uint8).data if little.size else b"")
        at = spec["offset"] + spec["nbytes"]
    return parts


def read_header(head: bytes, total_size: int) -> list[LeafSpec]:
    """Check a bundle's header and return its leaves' specs.

    ``head`` needs only the bundle's first bytes (at least the header);
    ``total_size`` is the size of the whole bundle, so leaf bounds are checked
    without reading the data.
    """
    if len(head) < len(MAGIC) + 4 or not head.startswith(MAGIC):
        raise BundleError("not an array bundle (bad magic); encode arrays with the SDK")
    (header_len,) = struct.unpack("<I", head[len(MAGIC) : len(MAGIC) + 4])
    end = len(MAGIC) + 4 + header_len
    if header_len > _MAX_HEADER or end > len(head) or end > total_size:
        raise BundleError("array bundle header is truncated or too large")
    try:
        header = json.loads(head[len(MAGIC) + 4 : end])
        raw_leaves = header["leaves"]
        if not isinstance(raw_leaves, list) or len(raw_leaves) > _MAX_LEAVES:
            raise BundleError(f"an array bundle holds a list of at most {_MAX_LEAVES} leaves")
        start = _data_start(header_len)
        return [_leaf(raw, start, total_size) for raw in raw_leaves]
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError(f"array bundle header is malformed: {e}") from None


def _leaf(raw: Any, data_start: int, total_size: int) -> LeafSpec:
    dtype = raw["dtype"]
    shape = raw["shape"]
    offset = raw["offset"]
    nbytes = raw["nbytes"]
    if dtype not in DTYPES:
        raise BundleError(f"array bundle has a leaf of unsupported dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_RANK
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise BundleError(f"array bundle has a leaf with a bad shape {shape!r}")
    if type(offset) is not int or type(nbytes) is not int:
        raise BundleError("array bundle leaf offsets and sizes must be integers")
    expected = DTYPES[dtype].itemsize * int(np.prod(shape, dtype=np.int64))
    if nbytes != expected:
        raise BundleError(f"array bundle leaf of shape {shape} {dtype} must hold {expected} bytes")
    if offset < 0 or data_start + offset + nbytes > total_size:
        raise BundleError("array bundle leaf lies outside the bundle (truncated upload?)")
    return LeafSpec(dtype=dtype, shape=tuple(shape), offset=data_start + offset, nbytes=nbytes)


def decode(data: bytes | memoryview) -> list[np.ndarray[Any, Any]]:
    """The arrays of a bundle, in order (read-only views of ``data``)."""
    view = memoryview(data)
    specs = read_header(bytes(view[:MAX_HEAD]), len(view))
    return [
        np.frombuffer(
            view, dtype=DTYPES[s.dtype].newbyteorder("<"), count=_size(s), offset=s.offset
        )
        .astype(DTYPES[s.dtype], copy=False)
        .reshape(s.shape)
        for s in specs
    ]


def _size(spec: LeafSpec) -> int:
    return int(np.prod(spec.shape, dtype=np.int64))


def _data_start(header_len: int) -> int:
    return _aligned(len(MAGIC) + 4 + header_len)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN
