"""The few places where the portability layer reaches below JAX's public API.

Kept in one module so that a JAX upgrade has one file to check. Each use has
a public fallback or a test that fails loudly if the internal moved:

- exporting from one lowering (``_export_lowered``) so that packaging traces
  and lowers the program once, and XLA's cost analysis reads that same lowering;
- XLA's cost analysis of an exported module (StableHLO to HLO, then
  ``hlo_module_cost_analysis``), which the broker uses to check a manifest;
- walking a module's operations to list its custom calls.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
from jax import export
from jax.extend.mlir import ir
from jax.interpreters import mlir


def export_with_cost(
    jitted: Any, specs: Sequence[Any], platforms: Sequence[str], example_args: Sequence[Any]
) -> tuple[export.Exported, dict[str, float]]:
    """Export ``jitted`` for ``platforms``, with XLA's cost analysis for ``example_args``.

    With static shapes the cost comes from the lowering the export used; with
    symbolic ones (or a JAX without these internals) from a lowering of the examples.
    """
    try:
        from jax._src import config
        from jax._src.export import _export
    except ImportError:  # pragma: no cover - a JAX without these internals
        exported = export.export(jitted, platforms=tuple(platforms))(*specs)
        return exported, _cost_dict(jitted.lower(*example_args).cost_analysis())
    _export.check_symbolic_scope_errors(jitted, specs, {})
    traced = jitted.trace(*specs)
    lowered = traced.lower(
        lowering_platforms=tuple(platforms),
        _private_parameters=mlir.LoweringParameters(
            for_export=True,
            hoist_constants_as_args=False,
            export_ignore_forward_compatibility=config.export_ignore_forward_compatibility.value,
        ),
    )
    exported = _export._export_lowered(lowered, traced.jaxpr, traced.fun_name, disabled_checks=())
    if all(_static(aval.shape) for aval in exported.in_avals):
        return exported, _cost_dict(lowered.cost_analysis())
    return exported, _cost_dict(jitted.lower(*example_args).cost_analysis())


def module_cost(exported: export.Exported) -> dict[str, float]:
    """XLA's cost analysis (flops, bytes accessed) of an exported module, for the
    CPU cost model. Needs static shapes."""
    from jax._src import xla_bridge
    from jax._src.lib import _jax  # type: ignore[attr-defined]

    text = exported.mlir_module()
    computation = _jax.mlir.mlir_module_to_xla_computation(
        text, use_tuple_args=False, return_tuple=False
    )
    backend = xla_bridge.get_backend("cpu")
    return _cost_dict(_jax.hlo_module_cost_analysis(backend, computation.as_hlo_module()))


def custom_call_targets(exported: export.Exported) -> set[str]:
    """The target names of every ``stablehlo.custom_call`` in the module."""
    targets: set[str] = set()
    with mlir.make_ir_context():
        module = ir.Module.parse(exported.mlir_module())
        for op in _operations(module.operation):
            if op.name == "stablehlo.custom_call":
                targets.add(ir.StringAttr(op.attributes["call_target_name"]).value)
    return targets


def _operations(op: Any) -> Iterator[Any]:
    for region in op.regions:
        for block in region:
            for inner in block:
                yield inner.operation
                yield from _operations(inner.operation)


def _cost_dict(cost: Any) -> dict[str, float]:
    if isinstance(cost, list | tuple):  # older JAX: one dict per computation
        cost = cost[0] if cost else {}
    return {
        "flops": max(0.0, float(cost.get("flops", 0.0))),
        "bytes": max(0.0, float(cost.get("bytes accessed", 0.0))),
    }


def _static(shape: Sequence[Any]) -> bool:
    return all(isinstance(d, int) for d in shape)


def local_platform() -> str:
    """The XLA platform of this process's default backend: cpu, cuda, rocm or tpu."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    version = jax.devices()[0].client.platform_version.lower()
    return "rocm" if "rocm" in version or "hip" in version else "cuda"
