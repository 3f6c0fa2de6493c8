"""Portable job artifacts: a JAX program exported once for every backend it may run on.

``package(fn, *example_args)`` exports ``fn`` with ``jax.export`` for several
XLA platforms in one multi-platform StableHLO module, and records a manifest:
input and output shapes and dtypes, XLA's cost analysis (flops and bytes), the
custom calls the module uses and the JAX version. ``package_step`` does the
same for the step of an iterative job, ``state = step(state, *args)``.

An artifact file is ``b"BRKART01" | u32 manifest length | manifest JSON |
program``, where the program is ``Exported.serialize()``. Its content address
(``Artifact.sha256``) is the SHA-256 of the whole file; the manifest carries
the program's own SHA-256 so that a changed program cannot keep its manifest.
"""

from __future__ import annotations

import builtins
import hashlib
import struct
from collections.abc import Sequence
from functools import cached_property
from typing import Any, Literal

import jax
import numpy as np
from jax import export

from broker.portable import _costworker, _xla
from broker.portable.arrays import dtype_name
from broker.portable.custom_calls import check_custom_calls
from broker.portable.manifest import (
    ALL_PLATFORMS,
    MAGIC,
    ArtifactError,
    Manifest,
    TensorSpec,
    read_container,
)

__all__ = [
    "ALL_PLATFORMS",
    "Artifact",
    "ArtifactError",
    "Manifest",
    "package",
    "package_step",
    "start_cost_worker",
    "stop_cost_worker",
]

_HALF = {"bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"}


class Artifact:
    """A packaged program: its manifest and the serialized ``jax.export.Exported``."""

    def __init__(
        self, manifest: Manifest, program: builtins.bytes, exported: export.Exported | None = None
    ) -> None:
        self.manifest = manifest
        self.program = program
        if exported is not None:
            self.__dict__["exported"] = exported

    @cached_property
    def exported(self) -> export.Exported:
        """The program as ``jax.export.Exported``: inspect it or call it directly."""
        try:
            return export.deserialize(bytearray(self.program))
        except Exception as e:
            raise ArtifactError(f"the program does not deserialize with jax.export: {e}") from e

    @property
    def platforms(self) -> tuple[str, ...]:
        return tuple(self.manifest.platforms)

    @property
    def flops(self) -> float:
        return self.manifest.flops

    @property
    def bytes(self) -> float:
        return self.manifest.bytes

    @property
    def dtype(self) -> str:
        return self.manifest.dtype

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @cached_property
    def sha256(self) -> str:
        """Content address of the artifact file."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def to_bytes(self) -> builtins.bytes:
        return self._file

    @cached_property
    def _file(self) -> builtins.bytes:
        # Built once: the manifest is frozen and the program is bytes.
        manifest = self.manifest.model_dump_json().encode()
        return MAGIC + struct.pack("<I", len(manifest)) + manifest + self.program

    @classmethod
    def from_bytes(cls, data: builtins.bytes) -> Artifact:
        """Read an artifact file; ArtifactError if it is malformed or tampered with."""
        manifest, program = read_container(data)
        return cls(manifest, program)

    def __call__(self, *args: Any) -> Any:
        """Run the program on this machine's default backend (as plain JAX would)."""
        return self.exported.call(*args)

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"Artifact({m.kind} {m.fun_name!r}, platforms={m.platforms}, "
            f"flops={m.flops:.3g}, bytes={m.bytes:.3g}, sha256={self.sha256[:12]}...)"
        )


def package(
    fn: Any,
    *example_args: Any,
    platforms: Sequence[str] = ALL_PLATFORMS,
    polymorphic_shapes: Any = None,
) -> Artifact:
    """Export ``fn(*example_args)`` for ``platforms`` as one portable artifact.

    ``example_args`` are arrays (or ``jax.ShapeDtypeStruct``) of the shapes the
    job runs on; the manifest's flops and bytes are XLA's cost analysis for them.
    ``polymorphic_shapes`` (as for ``jax.export.symbolic_args_specs``, e.g.
    ``(None, "b, ...")``) makes dimensions symbolic, so one artifact accepts
    inputs of several sizes.
    """
    return _package(fn, example_args, platforms, polymorphic_shapes, state_leaves=None)


def package_step(
    step_fn: Any,
    state: Any,
    *args: Any,
    platforms: Sequence[str] = ALL_PLATFORMS,
    polymorphic_shapes: Any = None,
) -> Artifact:
    """Export the step of an iterative job, ``state = step_fn(state, *args)``.

    The step must return a state of the same structure, shapes and dtypes as it
    takes, so that it can be run N times and checkpointed between steps. The
    manifest's cost is that of one step.
    """
    leaves = len(jax.tree.leaves(state))
    return _package(step_fn, (state, *args), platforms, polymorphic_shapes, state_leaves=leaves)


def start_cost_worker(wait: bool = True, timeout: float = 120.0) -> bool:
    """Start the process that runs XLA's cost analysis beside each export.

    ``package()`` starts it in the background after a process's first program
    and uses it once it is ready; a process that packages many programs can
    start it first, and with ``wait``, wait (up to ``timeout`` seconds) until it
    is ready. Returns whether it is; False if ``BROKER_PACKAGE_WORKER=0`` turns
    it off. Artifacts are the same with it or without it.
    """
    return _costworker.start(wait=wait, timeout=timeout)


def stop_cost_worker() -> None:
    """Stop that process: packaging runs the cost analysis in this process, until
    ``start_cost_worker()``."""
    _costworker.stop()


def _package(
    fn: Any,
    example_args: tuple[Any, ...],
    platforms: Sequence[str],
    polymorphic_shapes: Any,
    state_leaves: int | None,
) -> Artifact:
    platforms = _check_platforms(platforms)
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
    if polymorphic_shapes is None:
        specs = tuple(jax.tree.map(_spec, example_args))
    else:
        specs = tuple(export.symbolic_args_specs(example_args, polymorphic_shapes))
    try:
        result = _xla.export_program(jitted, specs, platforms, example_args)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"cannot export {_name(fn)}: {e}") from e
    exported, program, cost = result.exported, result.program, result.cost
    custom_calls = result.custom_calls
    if state_leaves is not None:
        _check_step(exported, state_leaves, fn)
    check_custom_calls(custom_calls, platforms)
    manifest = Manifest(
        kind="function" if state_leaves is None else "iterative",
        program_sha256=hashlib.sha256(program).hexdigest(),
        program_size=len(program),
        platforms=list(exported.platforms),  # type: ignore[arg-type]
        fun_name=exported.fun_name[:200],
        jax_version=jax.__version__,
        calling_convention_version=exported.calling_convention_version,
        devices=exported.nr_devices,
        inputs=[tensor_spec(a) for a in exported.in_avals],
        outputs=[tensor_spec(a) for a in exported.out_avals],
        state_leaves=state_leaves,
        # As the broker reads it (broker.portable.checks): any input shape symbolic.
        polymorphic=not all(isinstance(d, int) for a in exported.in_avals for d in a.shape),
        flops=cost["flops"],
        bytes=cost["bytes"],
        dtype=work_dtype(exported.in_avals),
        custom_calls=custom_calls,
    )
    return Artifact(manifest, program, exported)


def tensor_spec(aval: Any) -> TensorSpec:
    shape = [d if isinstance(d, int) else str(d) for d in aval.shape]
    return TensorSpec(shape=shape, dtype=dtype_name(aval.dtype))


def work_dtype(avals: Sequence[Any]) -> Literal["bf16", "fp32"]:
    """The precision the roofline should assume: ``bf16`` when most of the
    floating-point input bytes are half precision or narrower, else ``fp32``."""
    half = full = 0
    for aval in avals:
        dtype = np.dtype(aval.dtype)
        if not jax.numpy.issubdtype(dtype, jax.numpy.floating):
            continue
        size = dtype.itemsize * int(np.prod([d if isinstance(d, int) else 1 for d in aval.shape]))
        if dtype.name in _HALF:
            half += size
        else:
            full += size
    return "bf16" if half > full else "fp32"


def _check_platforms(platforms: Sequence[str]) -> list[str]:
    if isinstance(platforms, str):
        platforms = [platforms]
    unknown = [p for p in platforms if p not in ALL_PLATFORMS]
    if unknown or not platforms:
        raise ArtifactError(
            f"platforms must be some of {', '.join(ALL_PLATFORMS)}; got {list(platforms)}"
        )
    return list(dict.fromkeys(platforms))


def _check_step(exported: export.Exported, state_leaves: int, fn: Any) -> None:
    state_avals = exported.in_avals[:state_leaves]
    same = len(exported.out_avals) == state_leaves and all(
        o.shape == s.shape and o.dtype == s.dtype
        for o, s in zip(exported.out_avals, state_avals, strict=False)
    )
    state_tree = jax.tree.structure(jax.tree.unflatten(exported.in_tree, exported.in_avals)[0][0])
    if not same or str(exported.out_tree) != str(state_tree):
        raise ArtifactError(
            f"{_name(fn)} must return the new state with the same structure, shapes and "
            f"dtypes as the state it takes: takes {state_tree} "
            f"{[tensor_spec(a).model_dump() for a in state_avals]}, returns "
            f"{exported.out_tree} {[tensor_spec(a).model_dump() for a in exported.out_avals]}"
        )


def _spec(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    # Python scalars take JAX's dtypes (float32 unless x64 is on), as under jax.jit.
    array = x if hasattr(x, "shape") and hasattr(x, "dtype") else jax.numpy.asarray(x)
    return jax.ShapeDtypeStruct(array.shape, array.dtype)


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or repr(fn)
