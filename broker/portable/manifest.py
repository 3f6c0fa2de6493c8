"""The artifact manifest and file layout, readable without importing JAX.

An artifact file is ``b"BRKART01" | u32 manifest length | manifest JSON |
program``, where the program is ``jax.export.Exported.serialize()``.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.platforms import Platform
from broker.portable.arrays import DTYPES

MAGIC = b"BRKART01"
ALL_PLATFORMS: tuple[Platform, ...] = ("cpu", "cuda", "rocm", "tpu")
_MAX_MANIFEST = 4 * 1024 * 1024
_DIGEST = r"^[0-9a-f]{64}$"


class ArtifactError(ValueError):
    """An artifact cannot be built, read or accepted; the message says why."""


class TensorSpec(BaseModel):
    """Shape and dtype of one input or output leaf. A dimension is an integer or,
    for shape-polymorphic programs, a symbolic expression such as ``"b"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: list[int | str] = Field(max_length=32)
    dtype: str = Field(max_length=32)


class Manifest(BaseModel):
    """What the broker needs to know about a program without running it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = 1
    kind: Literal["function", "iterative"]
    program_sha256: str = Field(pattern=_DIGEST)
    program_size: int = Field(ge=1)
    platforms: list[Platform] = Field(min_length=1, max_length=4)
    fun_name: str = Field(max_length=200)
    jax_version: str = Field(max_length=64)
    calling_convention_version: int
    devices: int = Field(ge=1)
    inputs: list[TensorSpec] = Field(max_length=100_000)
    outputs: list[TensorSpec] = Field(max_length=100_000)
    state_leaves: int | None = Field(
        default=None, ge=0, description="Iterative jobs: the first leaves are the state"
    )
    polymorphic: bool
    flops: float = Field(ge=0, le=1e30, description="XLA cost analysis, one call")
    bytes: float = Field(ge=0, le=1e30, description="XLA cost analysis, bytes accessed")
    dtype: Literal["bf16", "fp32"]
    custom_calls: list[str] = Field(max_length=1000)


def io_bytes(
    manifest: Manifest, inputs: int, steps: int | None, checkpoint_every: int | None
) -> float:
    """Bytes a run moves besides its work: its inputs in, its results out, and for an
    iterative job the state of each checkpoint it writes. A leaf with a symbolic
    dimension counts as big as all the inputs."""
    sizes = [_leaf_bytes(spec, inputs) for spec in manifest.outputs]
    state = sum(sizes[: manifest.state_leaves or 0])
    checkpoints = (steps or 0) // checkpoint_every if checkpoint_every else 0
    return float(inputs + sum(sizes) + state * checkpoints)


def _leaf_bytes(spec: TensorSpec, otherwise: int) -> int:
    dtype = DTYPES.get(spec.dtype)
    if dtype is None or not all(isinstance(d, int) for d in spec.shape):
        return otherwise
    return math.prod(cast(list[int], spec.shape)) * dtype.itemsize


def read_container(data: bytes) -> tuple[Manifest, bytes]:
    """Split an artifact file into its manifest and program, checking the program's
    size and SHA-256 against the manifest; ArtifactError says what is wrong."""
    if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
        raise ArtifactError("not a broker artifact (bad magic); build one with package()")
    (length,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if length > _MAX_MANIFEST or start + length > len(data):
        raise ArtifactError("artifact manifest is truncated or too large")
    try:
        manifest = Manifest.model_validate_json(data[start : start + length])
    except ValidationError as e:
        raise ArtifactError(f"artifact manifest is invalid: {_first_error(e)}") from None
    program = bytes(data[start + length :])
    if len(program) != manifest.program_size:
        raise ArtifactError(
            f"artifact program is {len(program)} bytes but its manifest says "
            f"{manifest.program_size} (truncated upload?)"
        )
    if hashlib.sha256(program).hexdigest() != manifest.program_sha256:
        raise ArtifactError("artifact program does not match its manifest's program_sha256")
    return manifest, program


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
