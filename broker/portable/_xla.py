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
- XLA's cost analysis of an exported module as XLA optimizes it (compiled
  for the CPU, then ``hlo_module_cost_analysis`` of the optimized HLO, with
  loops of known length counted as often as they run), which the broker uses
  to check a manifest and packaging runs in a worker process (``_costworker``)
  beside the export;
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


def cpu_backend() -> Any:
    """The CPU backend: XLA's cost analysis here uses its cost model."""
    from jax._src import xla_bridge

    return xla_bridge.get_backend("cpu")


COST_MODEL = "optimized"  # what a manifest's flops and bytes are: see hlo_cost
MAX_LOOPS_COSTED = 8  # loops whose bodies are costed apart (one compile each)


def hlo_cost(bytecode: bytes, backend: Any) -> dict[str, float]:
    """XLA's cost analysis of a module as XLA will run it.

    The module is compiled for the CPU and the *optimized* HLO is analysed: its
    bytes are those of the fused program (an elementwise chain reads its input
    and writes its output once), not of every intermediate the unoptimized
    module names, which over-counted memory-bound programs several times. XLA
    counts a loop's body once; each loop with a trip count known from the
    program (``lax.fori_loop``, ``lax.scan``: a counter from a constant, below a
    constant, by a constant step) is counted that many times, its body's cost
    measured by peeling one iteration off and compiling again. A module the CPU
    compiler refuses falls back to the unoptimized module's analysis.

    It may run in a thread of its own: it compiles from bytes, and builds an
    MLIR context of its own only for a program with loops.
    """
    from jax._src.lib import _jax  # type: ignore[attr-defined]

    try:
        executable = _compile(bytecode, backend)
    except Exception:  # any refusal: the analysis of the module as written
        return unoptimized_cost(bytecode, backend)
    optimized = executable.hlo_modules()[0]
    base = _cost_dict(_jax.hlo_module_cost_analysis(backend, optimized))
    if " while(" not in optimized.to_string():
        return base  # no loop left in the program as XLA runs it
    try:
        with mlir.make_ir_context():
            return _with_loops(ir.Module.parse(bytecode), base, backend)
    except Exception:  # loops that cannot be read: counted once, as XLA counts them
        return base


def unoptimized_cost(bytecode: bytes, backend: Any) -> dict[str, float]:
    """XLA's cost analysis of a module as written (converted to HLO, not optimized):
    the cost model of manifests made before ``COST_MODEL`` was "optimized"."""
    from jax._src.lib import _jax  # type: ignore[attr-defined]

    computation = _jax.mlir.mlir_module_to_xla_computation(
        bytecode, use_tuple_args=False, return_tuple=False
    )
    return _cost_dict(_jax.hlo_module_cost_analysis(backend, computation.as_hlo_module()))


def _compile(module: Any, backend: Any) -> Any:
    """``module`` (MLIR bytecode, or a module) compiled for ``backend``, not cached."""
    from jax._src import compiler
    from jax._src.lib import _jax  # type: ignore[attr-defined]

    # Only the HLO passes matter for the cost (fusion, simplification); LLVM's
    # optimization of the generated code does not change it and is half the time.
    options = compiler.get_compile_options(
        num_replicas=1,
        num_partitions=1,
        env_options_overrides={"xla_backend_optimization_level": 0},  # type: ignore[dict-item]
    )
    devices = _jax.DeviceList(tuple(backend.devices()[:1]))
    return backend.compile_and_load(module, devices, options)


def _compiled_cost(module: Any, backend: Any) -> dict[str, float]:
    from jax._src.lib import _jax  # type: ignore[attr-defined]

    optimized = _compile(module, backend).hlo_modules()[0]
    return _cost_dict(_jax.hlo_module_cost_analysis(backend, optimized))


def _with_loops(module: Any, base: dict[str, float], backend: Any) -> dict[str, float]:
    """``base`` with each loop's body counted as often as the loop runs.

    The optimized module inlines every call, so XLA counts a loop's body once
    for each place the program reaches it from (``static``), while it runs as
    often as its trip count times those of the loops around it, through calls
    too (``runs``). With a body's own cost (the bodies of the loops inside it
    left out), the program costs ``base + sum(own * (runs - static))``."""
    graph = _LoopGraph(module.operation)
    if not graph.loops:
        return base
    inclusive: dict[int, dict[str, float]] = {}
    costed = 0
    for index in range(len(graph.loops)):
        if graph.trip[index] is None or graph.runs(index) <= graph.static(index):
            continue
        if costed == MAX_LOOPS_COSTED:
            break  # the rest count as XLA counts them
        costed += 1
        peeled = _peeled_cost(module, index, backend)
        if peeled is None:
            continue  # a body that cannot be peeled counts as XLA counts it
        times = graph.static(index)  # the peeled copy is inlined this many times too
        inclusive[index] = {k: max(0.0, (peeled[k] - base[k]) / times) for k in base}
    total = dict(base)
    for index, body in inclusive.items():
        own = dict(body)
        for inner in graph.children(index):
            for k in own:
                own[k] = max(0.0, own[k] - inclusive.get(inner, {}).get(k, 0.0))
        extra = graph.runs(index) - graph.static(index)
        for k in total:
            total[k] += own[k] * extra
    return total


def _peeled_cost(module: Any, index: int, backend: Any) -> dict[str, float] | None:
    """The cost of ``module`` with one iteration of loop ``index`` peeled off."""
    copy = module.operation.clone()
    try:
        _peel(_LoopGraph(copy).loops[index])
        return _compiled_cost(ir.Module.parse(str(copy)), backend)
    except Exception:  # an MLIR or XLA refusal of the peeled module
        return None


class _LoopGraph:
    """The loops of a module, their trip counts, and how its functions call each other."""

    def __init__(self, module_op: Any):
        self.loops: list[Any] = []
        self.functions: dict[str, Any] = {}
        calls: list[Any] = []

        def visit(op: Any) -> Any:
            if op.name == "stablehlo.while":
                self.loops.append(op)
            elif op.name == "func.call":
                calls.append(op)
            elif op.name == "func.func":
                self.functions[_symbol(op)] = op
            return ir.WalkResult.ADVANCE

        module_op.walk(visit, ir.WalkOrder.PRE_ORDER)
        self.trip = [_trip_count(loop) for loop in self.loops]
        self._index = {loop.operation: i for i, loop in enumerate(self.loops)}
        self._calls_to: dict[str, list[Any]] = {}
        for call in calls:
            self._calls_to.setdefault(_callee(call), []).append(call)
        self._memo: dict[tuple[str, bool], int] = {}

    def _context(self, op: Any) -> tuple[str, list[int]]:
        """The function ``op`` is in, and the loops around it there (their indices)."""
        around = []
        parent = op.operation.parent
        while parent is not None and parent.name != "func.func":
            if parent.name == "stablehlo.while" and parent.operation in self._index:
                around.append(self._index[parent.operation])
            parent = parent.parent
        return (_symbol(parent) if parent is not None else ""), around

    def _function(self, name: str, with_trips: bool) -> int:
        """How often function ``name`` runs (``with_trips``), or is reached from."""
        if (name, with_trips) in self._memo:
            return self._memo[(name, with_trips)]
        callers = self._calls_to.get(name, [])
        count = 0 if callers else 1  # main, or a function no call reaches
        for call in callers:
            caller, around = self._context(call)
            times = self._function(caller, with_trips)
            for i in around if with_trips else ():
                times *= self.trip[i] or 1
            count += times
        self._memo[(name, with_trips)] = count
        return count

    def static(self, index: int) -> int:
        return self._function(self._context(self.loops[index])[0], with_trips=False)

    def runs(self, index: int) -> int:
        function, around = self._context(self.loops[index])
        times = self._function(function, with_trips=True) * (self.trip[index] or 1)
        for i in around:
            times *= self.trip[i] or 1
        return times

    def children(self, index: int) -> list[int]:
        """The loops one level inside loop ``index``'s body (through calls too), once
        for each place its body reaches them from."""
        found: list[int] = []
        self._top_level(self.loops[index].regions[1], found)
        return found

    def _top_level(self, region: Any, found: list[int]) -> None:
        for block in region.blocks:
            for op in block.operations:
                if op.name == "stablehlo.while":
                    if op.operation in self._index:
                        found.append(self._index[op.operation])
                    continue  # what is inside it is its own
                if op.name == "func.call":
                    callee = self.functions.get(_callee(op))
                    if callee is not None:
                        self._top_level(callee.regions[0], found)
                for inner in op.regions:
                    self._top_level(inner, found)


def _symbol(function: Any) -> str:
    return str(ir.StringAttr(function.attributes["sym_name"]).value)


def _callee(call: Any) -> str:
    return str(ir.FlatSymbolRefAttr(call.attributes["callee"]).value)


def _constant_int(value: Any) -> int | None:
    owner = value.owner
    if not hasattr(owner, "name") or owner.name != "stablehlo.constant":
        return None
    try:
        dense = ir.DenseIntElementsAttr(owner.attributes["value"])
    except (ValueError, TypeError):
        return None
    if not dense.is_splat:
        return None
    splat: Any = dense.get_splat_value()
    return int(splat.value)


def _trip_count(loop: Any) -> int | None:
    """How many times ``loop`` runs, when its condition is ``counter < constant``
    and its body adds a constant step to a counter that starts at a constant."""
    cond, body = loop.regions[0].blocks[0], loop.regions[1].blocks[0]
    ops = [op for op in cond.operations if op.name != "stablehlo.constant"]
    if len(ops) != 2 or ops[0].name != "stablehlo.compare":
        return None
    compare = ops[0]
    if "LT" not in str(compare.attributes["comparison_direction"]):
        return None
    counter, limit = compare.operands
    arguments = list(cond.arguments)
    if counter not in arguments or list(ops[1].operands) != [compare.result]:
        return None
    k = arguments.index(counter)
    high, low = _constant_int(limit), _constant_int(loop.operands[k])
    step_op = list(body.operations)[-1].operands[k].owner
    if high is None or low is None or getattr(step_op, "name", "") != "stablehlo.add":
        return None
    a, b = step_op.operands
    own = list(body.arguments)[k]
    step = _constant_int(b) if a == own else _constant_int(a) if b == own else None
    if not step or step <= 0:
        return None
    return max(0, -(-(high - low) // step))


def _peel(loop: Any) -> None:
    """Run one iteration of ``loop``'s body before it (its cost, added once)."""
    body = loop.regions[1].blocks[0]
    mapping = dict(zip(body.arguments, loop.operands, strict=True))
    ops = list(body.operations)
    with ir.InsertionPoint(loop):
        for op in ops[:-1]:
            copy = op.clone()
            for i, operand in enumerate(list(copy.operands)):
                if operand in mapping:
                    copy.operands[i] = mapping[operand]
            mapping.update(zip(op.results, copy.results, strict=True))
    for i, value in enumerate([mapping.get(v, v) for v in ops[-1].operands]):
        loop.operands[i] = value


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
