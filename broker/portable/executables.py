"""Compiled programs for the runner, kept in memory and in the compilation cache.

The runner compiles an artifact as one of two programs on the local device:
a ``function`` artifact as a call of its flat input leaves, an ``iterative``
one as a loop of its step, ``state = step(state, *args)`` repeated ``count``
times (``count`` an argument, so that one executable runs chunks of any size).

JAX's persistent compilation cache alone would still leave a fresh process to
deserialize the program and lower the call before the cache is consulted, and
lowering a call of an exported program loads SciPy for CPU linear algebra
whether or not the program uses it. So the compiled executable itself is kept,
keyed by everything it depends on, in memory and under the compilation cache
directory; a later run loads it directly. Those files are as trusted as JAX's
own cache entries beside them: loading either runs native code from the
machine's cache directory, which only the provider's agent writes.

Only an executable this process compiled is written: XLA:CPU cannot serialize
again one it loaded from JAX's cache (the copy lacks some of its functions,
which shows only when another process runs it). So these programs are compiled
without leaving JAX's cache a copy of its own, and one that JAX served anyway
(an entry from before) is used but not written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
from jax import lax
from jax.experimental import serialize_executable
from jaxlib import version as jaxlib_version

from broker.portable import _xla
from broker.portable.artifact import Artifact

log = logging.getLogger(__name__)

Kind = Literal["function", "iterative"]
_FORMAT = "2"  # bump when the programs built here, or how they are kept, change
_MEMORY_ENTRIES = 16
_memory: OrderedDict[str, Callable[..., Any]] = OrderedDict()
_lock = threading.Lock()
_compiling = threading.local()  # .from_jax_cache: this thread's compile was a JAX cache hit


def _on_jax_event(event: str, **_: Any) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _compiling.from_jax_cache = True


jax.monitoring.register_event_listener(_on_jax_event)


def load(
    artifact: Artifact, leaves: Sequence[jax.Array], device: Any, cache_dir: Path | None
) -> Callable[..., Any]:
    """The artifact compiled for ``device`` and the shapes of ``leaves``.

    For a ``function`` artifact it is called as ``program(*leaves)``; for an
    ``iterative`` one as ``program(np.int32(count), *state, *args)``, which runs
    ``count`` steps. Both return a flat list of arrays. Raises TypeError or
    ValueError if the leaves do not fit the program.
    """
    kind: Kind = artifact.manifest.kind
    key = _key(artifact, kind, leaves, device)
    with _lock:
        if key in _memory:
            _memory.move_to_end(key)
            return _memory[key]
    path = None if cache_dir is None else cache_dir / "broker-executables" / f"{key}.bin"
    program: Callable[..., Any] | None = None
    if path is not None:
        program = _read(path, artifact, kind, leaves, device)
    if program is None:
        if path is None:
            program = _compile(artifact, kind, leaves)
        else:
            _compiling.from_jax_cache = False
            with _xla.no_persistent_cache_writes():
                program = _compile(artifact, kind, leaves)
            if not _compiling.from_jax_cache:
                _write(path, program, kind, leaves)
    with _lock:
        _memory[key] = program
        while len(_memory) > _MEMORY_ENTRIES:
            _memory.popitem(last=False)
    return program


def _compile(artifact: Artifact, kind: Kind, leaves: Sequence[jax.Array]) -> Any:
    exported = artifact.exported

    def call(*xs: Any) -> list[Any]:
        args, kwargs = jax.tree.unflatten(exported.in_tree, xs)
        return jax.tree.leaves(exported.call(*args, **kwargs))

    if kind == "function":
        return jax.jit(call).lower(*leaves).compile()
    state_n = artifact.manifest.state_leaves or 0

    def steps(count: Any, *xs: Any) -> list[Any]:
        state, args = list(xs[:state_n]), xs[state_n:]
        # One executable loops over the step on the device: no dispatch per step.
        final: list[Any] = lax.fori_loop(0, count, lambda _, s: call(*s, *args), state)
        return final

    return jax.jit(steps).lower(np.int32(1), *leaves).compile()


def _key(artifact: Artifact, kind: Kind, leaves: Sequence[jax.Array], device: Any) -> str:
    """Everything the executable depends on: the program, how it is called, on
    which device and with which inputs, and the compiler that built it."""
    parts = [
        _FORMAT,
        kind,
        artifact.manifest.program_sha256,
        jax.__version__,
        jaxlib_version.__version__,
        device.platform,
        device.device_kind,
        device.client.platform_version,
        os.environ.get("XLA_FLAGS", ""),
        os.environ.get("LIBTPU_INIT_ARGS", ""),
        str(jax.config.read("jax_enable_x64")),
        *(f"{x.dtype}{x.shape}" for x in leaves),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _trees(kind: Kind, leaves: int, outputs: int) -> tuple[Any, Any]:
    """The argument and result structures of the programs built by ``_compile``."""
    arguments = leaves + (kind == "iterative")
    return jax.tree.structure(((0,) * arguments, {})), jax.tree.structure([0] * outputs)


def _outputs(artifact: Artifact, kind: Kind) -> int:
    manifest = artifact.manifest
    return len(manifest.outputs) if kind == "function" else manifest.state_leaves or 0


def _read(
    path: Path, artifact: Artifact, kind: Kind, leaves: Sequence[jax.Array], device: Any
) -> Any:
    try:
        payload = path.read_bytes()
    except OSError:
        return None
    if device.platform == "cpu" and _uses_lapack(artifact):
        _xla.initialize_cpu_routines()  # what lowering the call would have done
    in_tree, out_tree = _trees(kind, len(leaves), _outputs(artifact, kind))
    try:
        return serialize_executable.deserialize_and_load(
            payload, in_tree, out_tree, backend=device.client, execution_devices=[device]
        )
    except Exception as e:  # a torn or stale file: compile again and replace it
        log.warning("compiled program %s is unreadable (%s); compiling again", path.name, e)
        return None


def _write(path: Path, program: Any, kind: Kind, leaves: Sequence[jax.Array]) -> None:
    try:
        payload, in_tree, out_tree = serialize_executable.serialize(program)
    except (ValueError, NotImplementedError) as e:  # a backend that cannot serialize
        log.info("compiled program not cached: %s", e)
        return
    if (in_tree, out_tree) != _trees(kind, len(leaves), out_tree.num_leaves):
        return  # a JAX that builds these programs differently: _read could not rebuild them
    # Written aside and renamed, so that a concurrent run never reads half a file.
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except OSError as e:  # a full or read-only disk costs the next start, not this run
        log.warning("cannot cache compiled program %s: %s", path.name, e)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _uses_lapack(artifact: Artifact) -> bool:
    # The program's bytes hold its custom calls' names verbatim: checked as well as
    # the manifest, so that a manifest that hides one cannot crash the process.
    return b"lapack_" in artifact.program or any(
        target.startswith("lapack_") for target in artifact.manifest.custom_calls
    )


def clear_memory() -> None:
    """Forget the programs compiled in this process (tests, benchmarks)."""
    with _lock:
        _memory.clear()
