"""The few places where the portability layer reaches below JAX's public API.

Kept in one module so that a JAX upgrade has one file to check. Each use has
a public fallback or a test that fails loudly if the internal moved:

- exporting from one lowering (``_export_lowered``) so that packaging traces
  and lowers the program once, and XLA's cost analysis and the list of custom
  calls read that same lowering, in memory;
- letting that export copy the module into the lowering's own MLIR context
  instead of a new one (``_reuse_context``: JAX's ``make_ir_context``, wrapped,
  returns that context once, in this thread only), which saves the 3 to 5 ms
  a context with JAX's dialects costs to build and free;
- preparing an exported module for XLA's cost analysis (``_cost.hlo_cost``:
  the module as XLA optimizes it, loops counted as often as they run), which
  the broker uses to check a manifest and packaging runs in a worker process
  (``_costworker``) beside the export;
- reading an exported module's operations to list its custom calls and to
  merge identical platform branches before that cost analysis;
- initializing the CPU's LAPACK routines, which a cached executable needs
  before it runs when nothing was lowered in this process;
- compiling without writing JAX's persistent compilation cache.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import jax
from jax import export
from jax.extend.mlir import ir
from jax.interpreters import mlir

from broker.portable import _costworker
from broker.portable._cost import cost_dict as _cost_dict
from broker.portable._cost import cpu_backend, hlo_cost, unoptimized_cost
from broker.portable.routines import CallSite, Tensor


@dataclass(frozen=True)
class Export:
    """An exported program with what the manifest says about it."""

    exported: export.Exported
    program: bytes  # exported.serialize()
    cost: dict[str, float]  # XLA's cost analysis: flops, bytes
    custom_calls: list[str]  # sorted target names of its custom calls


def export_program(
    jitted: Any, specs: Sequence[Any], platforms: Sequence[str], example_args: Sequence[Any]
) -> Export:
    """Export ``jitted`` for ``platforms`` and serialize it, with XLA's cost analysis
    for ``example_args`` and the custom calls the module makes.

    With static shapes both come from the lowering the export used, read in
    memory (parsing the exported module again costs as much as lowering), and
    XLA's cost analysis runs while the export and its serialization do: in the
    cost worker process when it is ready and idle, else in a thread of its own;
    with symbolic shapes (or a JAX without these internals) the cost comes from
    a lowering of the examples and the custom calls from the exported module.
    """
    try:
        from jax._src import config
        from jax._src.export import _export
    except ImportError:  # pragma: no cover - a JAX without these internals
        exported = export.export(jitted, platforms=tuple(platforms))(*specs)
        cost = _cost_dict(jitted.lower(*example_args).cost_analysis())
        targets = program_facts(exported, with_cost=False)[0]
        return Export(exported, bytes(exported.serialize()), cost, targets)
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
    module = lowered.compiler_ir("stablehlo")

    def export_lowered() -> export.Exported:
        with _reuse_context(module.context):
            return _export._export_lowered(
                lowered, traced.jaxpr, traced.fun_name, disabled_checks=()
            )

    if not all(_static(aval.shape) for aval in jax.tree.leaves(lowered.in_avals)):
        return _export_from_examples(jitted, export_lowered(), example_args)
    # With static shapes the exported module is this module, copied, with one
    # more attribute (export wraps "main" only for symbolic shapes or ordered
    # effects): the custom calls and the cost are read from a copy of it.
    with module.context:
        copy = module.operation.clone()  # JAX may cache the lowering: leave it as is
    targets, cases = _scan(copy)
    bytecode = _for_cost(copy, cases)
    backend = cpu_backend()
    # XLA's conversion to HLO holds the GIL. In the cost worker, another process,
    # it runs beside the whole export. Without a worker ready and idle, it runs in
    # a thread, which takes the GIL when the export's versioned serialization
    # (serialize_portable_artifact) releases it: only that part runs at once.
    # The conversion touches no MLIR object of this process: it reads bytes into
    # a context of its own.
    request = _costworker.submit(bytecode, lambda: hlo_cost(bytecode, backend))
    analysis = request or _Background(hlo_cost, bytecode, backend)
    analysis.start()
    try:
        exported = export_lowered()
    except BaseException:
        analysis.wait()
        raise
    if exported.ordered_effects:
        analysis.wait()
        result = _export_from_examples(jitted, exported, example_args)
    else:
        program = bytes(exported.serialize())  # while the worker may still be at it
        result = Export(exported, program, analysis.result(), targets)
    if request is None:
        _costworker.start_soon()  # for the next program, once this one is done
    return result


def _export_from_examples(jitted: Any, exported: export.Exported, example_args: Any) -> Export:
    """The cost from a lowering of the examples, the custom calls from the exported module."""
    cost = _cost_dict(jitted.lower(*example_args).cost_analysis())
    targets = program_facts(exported, with_cost=False)[0]
    return Export(exported, bytes(exported.serialize()), cost, targets)


class _Background:
    """``fn(*args)`` in a thread of its own, from ``start()`` on; ``result()`` waits.

    The thread is started at once but waits for ``start()``: a thread that ran
    straight into C++ that holds the GIL would stop the caller until it is done.
    Started, it takes the GIL when the caller next releases it.
    """

    def __init__(self, fn: Any, *args: Any) -> None:
        self._go = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(fn, args), name="broker-cost-analysis", daemon=True
        )
        self._thread.start()

    def _run(self, fn: Any, args: tuple[Any, ...]) -> None:
        self._go.wait()
        try:
            self._value = fn(*args)
        except BaseException as e:  # re-raised by result(), in the caller's thread
            self._error = e

    def start(self) -> None:
        self._go.set()

    def wait(self) -> None:
        self._go.set()
        self._thread.join()

    def result(self) -> Any:
        self.wait()
        if self._error is not None:
            raise self._error
        return self._value


_reuse = threading.local()
_install = threading.Lock()


@contextmanager
def _reuse_context(context: Any) -> Iterator[None]:
    """In this thread, the next ``make_ir_context()`` inside JAX returns ``context``.

    ``_export_lowered`` copies the lowered module (JAX may cache it) by parsing
    it into a new context, which costs the loading of JAX's dialects (3 to 5
    ms, a third of a small program's lowering). Parsed into the
    lowering's context, it is the same copy: the serialized program is
    byte-for-byte the same. JAX's function is wrapped once per process; the
    wrapper gives ``context`` out once, in this thread only, and otherwise
    makes a new context as JAX does. If JAX stops calling ``make_ir_context``
    there, the export is only slower.
    """
    from jax._src.interpreters import mlir as jax_mlir

    if not getattr(jax_mlir.make_ir_context, "_reuses", False):
        with _install:
            original = jax_mlir.make_ir_context
            if not getattr(original, "_reuses", False):

                @functools.wraps(original)
                def make_ir_context() -> Any:
                    given = getattr(_reuse, "context", None)
                    if given is None:
                        return original()
                    _reuse.context = None
                    return given

                make_ir_context._reuses = True  # type: ignore[attr-defined]
                jax_mlir.make_ir_context = make_ir_context
    _reuse.context = context
    try:
        yield
    finally:
        _reuse.context = None


def program_facts(
    exported: export.Exported, *, with_cost: bool
) -> tuple[list[str], dict[str, float] | None]:
    """The sorted target names of the module's custom calls and, ``with_cost``,
    XLA's cost analysis (flops, bytes accessed) for the CPU cost model, which
    needs static shapes. Both as ``export_program`` computes them."""
    targets, _, cost = inspect_program(exported, with_cost=with_cost)
    return targets, cost


def inspect_program(
    exported: export.Exported, *, with_cost: bool, optimized: bool = True
) -> tuple[list[str], list[CallSite], dict[str, float] | None]:
    """``program_facts``, and every custom call with its operand and result types
    and its backend configuration, as the program has them (``broker.portable.routines``
    checks them against each routine's contract). Not ``optimized``: the cost
    model of manifests made before this one (``unoptimized_cost``)."""
    from jax._src.lib import _jax  # type: ignore[attr-defined]

    with mlir.make_ir_context():
        module = _jax.mlir.deserialize_portable_artifact(exported.mlir_module_serialized)
        sites: list[CallSite] = []
        targets, cases = _scan(module.operation, sites)
        if not with_cost:
            return targets, sites, None
        bytecode = _for_cost(module.operation, cases)
    analyse = hlo_cost if optimized else unoptimized_cost
    return targets, sites, analyse(bytecode, cpu_backend())


def smallest_cost(exported: export.Exported) -> dict[str, float] | None:
    """XLA's cost analysis of a shape-polymorphic program at its smallest shapes (every
    symbolic dimension 1), compiled for the CPU: a floor under the cost at any shapes
    it runs on (for programs whose work grows with their sizes). None when the
    program's shape constraints refuse those shapes."""
    shapes = [a.shape for a in exported.in_avals]
    names: set[str] = set()
    for shape in shapes:
        for d in shape:
            if not isinstance(d, int):
                names |= set(d.get_vars())
    env = dict.fromkeys(names, 1)
    try:
        specs = [
            jax.ShapeDtypeStruct(
                tuple(d if isinstance(d, int) else int(d._evaluate(env)) for d in a.shape),
                a.dtype,
            )
            for a in exported.in_avals
        ]
        args, kwargs = jax.tree.unflatten(exported.in_tree, specs)
        # Compiled: XLA refines the program's dynamic shapes only when it compiles.
        compiled = jax.jit(exported.call).lower(*args, **kwargs).compile()
        return _cost_dict(compiled.cost_analysis())
    except Exception:  # constraints (say, b >= 2) that the smallest shapes break
        return None


def _is(value: Any, kind: Any) -> bool:
    if isinstance(value, kind):
        return True
    try:  # bindings that hand out base classes: compare the type ids
        return bool(value.typeid == kind.static_typeid)
    except (AttributeError, ValueError):
        return False


def _tensor(t: Any) -> Tensor:
    if not _is(t, ir.RankedTensorType):
        return Tensor(None, str(t))
    ranked = ir.RankedTensorType(t)
    static = ranked.has_static_shape
    return Tensor(tuple(ranked.shape) if static else None, str(ranked.element_type))


def _attribute_value(attr: Any) -> Any:
    for kind in (ir.BoolAttr, ir.IntegerAttr, ir.StringAttr):
        if _is(attr, kind):
            return kind(attr).value
    return str(attr)


def _call_site(op: Any, target: str) -> CallSite:
    config: dict[str, Any] = {}
    if "mhlo.backend_config" in op.attributes:
        raw = op.attributes["mhlo.backend_config"]
        if _is(raw, ir.DictAttr):
            entries = ir.DictAttr(raw)
            for i in range(len(entries)):
                named = entries[i]
                config[named.name] = _attribute_value(named.attr)
    return CallSite(
        target,
        tuple(_tensor(v.type) for v in op.operands),
        tuple(_tensor(r.type) for r in op.results),
        config,
    )


def _scan(module: Any, sites: list[CallSite] | None = None) -> tuple[list[str], list[Any]]:
    """The custom calls' targets, and the ``stablehlo.case`` operations, inner ones
    first: one pass over the module. With ``sites``, each custom call is added to it."""
    targets: set[str] = set()
    cases: list[Any] = []

    def visit(op: Any) -> Any:
        name = op.name
        if name == "stablehlo.custom_call":
            target = ir.StringAttr(op.attributes["call_target_name"]).value
            targets.add(target)
            if sites is not None:
                sites.append(_call_site(op, target))
        elif name == "stablehlo.case":
            cases.append(op)
        return ir.WalkResult.ADVANCE

    module.walk(visit, ir.WalkOrder.POST_ORDER)
    return sorted(targets), cases


def _for_cost(module: Any, cases: list[Any]) -> bytes:
    """``module`` ready for XLA's cost analysis (its identical platform branches
    merged: it may change ``module``), as MLIR bytecode."""
    _drop_unused_cases(_merge_identical_branches(cases))
    return mlir.module_to_bytecode(module)


def _merge_identical_branches(cases: list[Any]) -> list[Any]:
    """Replace each ``stablehlo.case`` whose branches are all the same by that branch.

    A multi-platform export puts every operation whose lowering differs between
    platforms under a case on the platform; most branches come out identical
    (a matmul is one op on every platform). The result is the same program, but
    XLA converts it to HLO in half the time, and its cost analysis (which takes
    the most expensive branch of a conditional) gives the same flops. ``cases``
    lists inner cases first, so that an outer one compares its branches merged.
    Returns the cases left.
    """
    left = []
    for case in cases:
        first, *others = case.regions
        if not others or not all(_same_region(first, other, {}) for other in others):
            left.append(case)
            continue
        body = list(first.blocks[0].operations)
        for op in body[:-1]:
            op.move_before(case)
        for result, value in zip(case.results, body[-1].operands, strict=True):
            result.replace_all_uses_with(value)
        case.erase()
    return left


_CONSTANT_OPS = {"stablehlo.constant", "stablehlo.return"}


def _drop_unused_cases(cases: list[Any]) -> None:
    """Erase each of ``cases`` (in program order) whose results are unused and whose
    branches only return values (constants, or values from outside the case).

    Where a primitive has platform-specific lowering rules, a multi-platform
    export maps the platform index to a rule index with such a case (a matmul:
    cpu, cuda, rocm, tpu to 0, 2, 2, 1) and picks the rule's branch with a
    second case on that index; once the second is merged, the first is left
    unused. XLA drops it too, so the cost is the same, but only after
    converting it: a conditional with one computation per platform.
    """
    for case in reversed(cases):
        if any(_used(result) for result in case.results):
            continue
        if all(
            op.name in _CONSTANT_OPS
            for region in case.regions
            for block in region.blocks
            for op in block.operations
        ):
            case.erase()


def _used(value: Any) -> bool:
    return any(True for _ in value.uses)


def _same_region(a: Any, b: Any, seen: dict[Any, Any]) -> bool:
    """Whether regions ``a`` and ``b`` compute the same thing from the same values;
    ``seen`` maps the values ``b`` defines to their twins in ``a``."""
    blocks_a, blocks_b = list(a.blocks), list(b.blocks)
    if len(blocks_a) != len(blocks_b):
        return False
    for block_a, block_b in zip(blocks_a, blocks_b, strict=True):
        args_a, args_b = list(block_a.arguments), list(block_b.arguments)
        if [x.type for x in args_a] != [y.type for y in args_b]:
            return False
        seen.update(zip(args_b, args_a, strict=True))
        ops_a, ops_b = list(block_a.operations), list(block_b.operations)
        if len(ops_a) != len(ops_b):
            return False
        if not all(_same_op(x, y, seen) for x, y in zip(ops_a, ops_b, strict=True)):
            return False
    return True


def _same_op(a: Any, b: Any, seen: dict[Any, Any]) -> bool:
    if a.name != b.name:
        return False
    a, b = a.operation, b.operation
    operands_a, operands_b = a.operands, b.operands
    results_a, results_b = a.results, b.results
    if (
        len(operands_a) != len(operands_b)
        or len(results_a) != len(results_b)
        or any(seen.get(y, y) != x for x, y in zip(operands_a, operands_b, strict=True))
        or any(x.type != y.type for x, y in zip(results_a, results_b, strict=True))
        or _attributes(a) != _attributes(b)
    ):
        return False
    regions_a, regions_b = a.regions, b.regions
    if len(regions_a) != len(regions_b) or not all(
        _same_region(x, y, seen) for x, y in zip(regions_a, regions_b, strict=True)
    ):
        return False
    seen.update(zip(results_b, results_a, strict=True))
    return True


def _attributes(op: Any) -> dict[str, Any]:
    # items() reads the attributes in one call, a third of the time of indexing them
    return dict(op.attributes.items())


def _static(shape: Sequence[Any]) -> bool:
    return all(isinstance(d, int) for d in shape)


def local_platform() -> str:
    """The XLA platform of this process's default backend: cpu, cuda, rocm or tpu."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    version = jax.devices()[0].client.platform_version.lower()
    return "rocm" if "rocm" in version or "hip" in version else "cuda"


def initialize_cpu_routines() -> None:
    """Load the LAPACK routines behind JAX's CPU linear algebra (``lapack_*_ffi``).

    Lowering a call of an exported program does this; a cached executable that
    skips lowering must do it itself before it runs one of them. It imports
    SciPy, a noticeable part of a fresh process's start, so it is done only then.
    """
    from jax._src.lax import linalg

    linalg.initialize_lapack()


@contextmanager
def no_persistent_cache_writes() -> Iterator[None]:
    """In this thread, compiles read JAX's persistent compilation cache but do not
    write it (its threshold on compile time is set out of reach)."""
    from jax._src import config

    with config.persistent_cache_min_compile_time_secs(float("inf")):
        yield
