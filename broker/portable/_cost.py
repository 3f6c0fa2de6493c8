"""XLA's cost analysis of a program as XLA will run it (``hlo_cost``).

Split from ``_xla`` (which exports and reads programs): the module is compiled
for the CPU and its optimized HLO analysed, with each loop of known length
counted as often as it runs. Like ``_xla``, it reaches below JAX's public API
(``compile_and_load``, ``hlo_module_cost_analysis``), and is kept to one file
so that a JAX upgrade has these places to check.
"""

from __future__ import annotations

from typing import Any

from jax.extend.mlir import ir
from jax.interpreters import mlir

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
    base = cost_dict(_jax.hlo_module_cost_analysis(backend, optimized))
    if " while(" not in optimized.to_string():
        return base  # no loop left in the program as XLA runs it
    try:
        with mlir.make_ir_context():
            return _with_loops(ir.Module.parse(bytecode), base, backend)
    except Exception:  # loops that cannot be read: counted once, as XLA counts them
        return base


def unoptimized_cost(bytecode: bytes, backend: Any) -> dict[str, float]:
    """XLA's cost analysis of a module as written (converted to HLO, not optimized):
    the cost model of manifests made before ``hlo_cost``'s."""
    from jax._src.lib import _jax  # type: ignore[attr-defined]

    computation = _jax.mlir.mlir_module_to_xla_computation(
        bytecode, use_tuple_args=False, return_tuple=False
    )
    return cost_dict(_jax.hlo_module_cost_analysis(backend, computation.as_hlo_module()))


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
    return cost_dict(_jax.hlo_module_cost_analysis(backend, optimized))


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


def cost_dict(cost: Any) -> dict[str, float]:
    if isinstance(cost, list | tuple):  # older JAX: one dict per computation
        cost = cost[0] if cost else {}
    return {
        "flops": max(0.0, float(cost.get("flops", 0.0))),
        "bytes": max(0.0, float(cost.get("bytes accessed", 0.0))),
    }


def cpu_backend() -> Any:
    """The CPU backend: XLA's cost analysis here uses its cost model."""
    from jax._src import xla_bridge

    return xla_bridge.get_backend("cpu")
