"""What the broker checks before it accepts an artifact or a job's inputs.

Which custom calls a program may make is broker.portable.custom_calls's rule: a StableHLO
custom call names native code that the
runtime already has, so it cannot carry code of its own, but it can reach any
routine the runtime registered. Only the routines JAX itself emits for linear
algebra and random numbers are allowed, per platform; Pallas/Triton/Mosaic
kernels, TensorFlow calls and anything unknown are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from broker.portable import routines
from broker.portable.arrays import DTYPES, LeafSpec
from broker.portable.custom_calls import check_custom_calls
from broker.portable.manifest import ArtifactError

if TYPE_CHECKING:  # JAX is imported only when an artifact is checked
    from broker.portable.artifact import Artifact


def verify_artifact(data: bytes) -> Artifact:
    """Read and check an uploaded artifact; ArtifactError says what is wrong.

    Checks that the program deserializes with ``jax.export``, that the manifest
    tells the truth about it (platforms, shapes, dtypes, polymorphism, custom
    calls, cost), and that its custom calls are allowed and keep their routines'
    contracts. Agents run it again on what they download, before they run it.
    """
    from broker.portable import _xla
    from broker.portable.artifact import Artifact, tensor_spec, work_dtype

    artifact = Artifact.from_bytes(data)
    manifest, exported = artifact.manifest, artifact.exported
    _same("platforms", list(exported.platforms), manifest.platforms)
    _same("inputs", [tensor_spec(a) for a in exported.in_avals], manifest.inputs)
    _same("outputs", [tensor_spec(a) for a in exported.out_avals], manifest.outputs)
    _same("devices", exported.nr_devices, manifest.devices)
    _same("dtype", work_dtype(exported.in_avals), manifest.dtype)
    if exported.nr_devices != 1:
        raise ArtifactError(
            f"the program is sharded over {exported.nr_devices} devices; the runner runs "
            "single-device programs (export without shardings)"
        )
    if manifest.kind == "iterative":
        state = manifest.state_leaves or 0
        if manifest.outputs != manifest.inputs[:state] or state > len(manifest.inputs):
            raise ArtifactError("an iterative program must return a state like the one it takes")
    elif manifest.state_leaves is not None:
        raise ArtifactError("manifest: state_leaves is only for iterative programs")
    # Polymorphism is read from the program: a fixed-shape program that claims it
    # would skip the cost analysis below.
    polymorphic = not all(_static(a.shape) for a in exported.in_avals)
    _same("polymorphic", polymorphic, manifest.polymorphic)
    targets, sites, cost = _xla.inspect_program(exported, with_cost=not polymorphic)
    _same("custom_calls", targets, manifest.custom_calls)
    check_custom_calls(targets, manifest.platforms)
    routines.check_call_sites(sites)
    if cost is not None:
        _check_cost(exported, cost, manifest.flops, manifest.bytes)
    # A polymorphic program's flops are its cost at example shapes the broker never
    # sees; they may not be less than its cost at the smallest shapes it accepts (half
    # of it, for slack; bytes are not floored, as fusion changes them).
    elif (floor := _xla.smallest_cost(exported)) is not None and (
        manifest.flops < 0.5 * floor["flops"] - 1.0
    ):
        raise ArtifactError(
            f"the manifest's flops ({manifest.flops:.6g}) are less than XLA's cost "
            f"analysis of the program at its smallest shapes ({floor['flops']:.6g}, "
            "every symbolic dimension 1)"
        )
    return artifact


def check_runnable(artifact: Artifact, platform: str, max_output_bytes: int | None) -> None:
    """ArtifactError unless the artifact can run on ``platform`` and its outputs (when
    their shapes are static) fit in ``max_output_bytes``."""
    if platform not in artifact.platforms:
        raise ArtifactError(
            f"this machine runs {platform}, but the artifact was exported only for "
            f"{', '.join(artifact.platforms)}"
        )
    if max_output_bytes is None:
        return
    total = 0
    for spec in artifact.manifest.outputs:
        if not _static(spec.shape):
            continue
        count = 1
        for d in spec.shape:
            count *= int(d)
        total += count * DTYPES[spec.dtype].itemsize
    if total > max_output_bytes:
        raise ArtifactError(
            f"the program's outputs are {total} bytes, over the {max_output_bytes} bytes "
            "this provider accepts for a result"
        )


def check_inputs(artifact: Artifact, leaves: Sequence[LeafSpec]) -> None:
    """ArtifactError unless ``leaves`` fit the program's inputs: count, dtypes, and
    shapes (symbolic dimensions must bind consistently, as ``Exported.call`` checks)."""
    import jax

    inputs = artifact.manifest.inputs
    if len(leaves) != len(inputs):
        raise ArtifactError(f"the program takes {len(inputs)} input arrays; got {len(leaves)}")
    for i, (leaf, spec) in enumerate(zip(leaves, inputs, strict=True)):
        if leaf.dtype != spec.dtype or len(leaf.shape) != len(spec.shape):
            raise ArtifactError(
                f"input {i} must be {spec.dtype}{spec.shape}; got {leaf.dtype}{list(leaf.shape)}"
            )
    exported = artifact.exported
    structs = [jax.ShapeDtypeStruct(leaf.shape, DTYPES[leaf.dtype]) for leaf in leaves]
    args, kwargs = jax.tree.unflatten(exported.in_tree, structs)
    try:
        jax.eval_shape(exported.call, *args, **kwargs)
    except ValueError as e:
        raise ArtifactError(f"inputs do not fit the program: {e}") from None


def _static(shape: Sequence[Any]) -> bool:
    return all(isinstance(d, int) for d in shape)


def _same(what: str, actual: Any, claimed: Any) -> None:
    if actual != claimed:
        raise ArtifactError(
            f"the manifest's {what} ({_short(claimed)}) does not match the program "
            f"({_short(actual)})"
        )


def _check_cost(exported: Any, cost: dict[str, float], flops: float, bytes_: float) -> None:
    """The manifest's flops and bytes are XLA's cost analysis of the program as XLA
    optimizes it (``_cost.hlo_cost``). A manifest made before that model, with the
    unoptimized module's analysis, is accepted only where it claims no less work
    than the program does: such a claim can only make its own job look dearer."""
    claims = {"flops": flops, "bytes": bytes_}
    if all(_near(cost[k], claims[k]) for k in claims):
        return
    from broker.portable import _xla  # JAX, imported only where a check needs it

    _, _, before = _xla.inspect_program(exported, with_cost=True, optimized=False)
    if before is not None and all(
        _near(before[k], claims[k]) and claims[k] >= 0.99 * cost[k] for k in claims
    ):
        return
    for key in ("flops", "bytes"):
        _close(key, cost[key], claims[key])


def _near(actual: float, claimed: float) -> bool:
    return abs(actual - claimed) <= 0.01 * max(actual, claimed) + 1.0


def _close(what: str, actual: float, claimed: float) -> None:
    if not _near(actual, claimed):
        raise ArtifactError(
            f"the manifest's {what} ({claimed:.6g}) is not XLA's cost analysis of the "
            f"program ({actual:.6g})"
        )


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 200 else text[:200] + "..."
