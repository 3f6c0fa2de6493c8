"""Imports run one way: down the layers below (README, "Layout"), never back up.

Each module of ``broker/`` and ``web/`` belongs to the first layer with a pattern
that matches its name. A module may import its own package and any layer below
its own; packages that share a layer are independent of each other. Imports
inside functions count too, so a lazy import is no way round a layer.
"""

from __future__ import annotations

import ast
from fnmatch import fnmatchcase
from functools import cache
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Top to bottom. Within a layer, each pattern is a package independent of the others.
LAYERS: tuple[tuple[str, ...], ...] = (
    # Entry points: the command line, the processes it starts, the app, the dashboard.
    ("broker.cli", "broker.demo"),
    ("broker.app",),
    ("broker.supervise", "web", "broker.servicecli"),
    ("broker.devcli",),
    # The periodic work (clearing, sweeps, billing), led by one replica at a time.
    ("broker.periodic",),
    # HTTP: routes, and who may call them.
    ("broker.*.router",),
    ("broker.auth", "broker.shortcuts"),
    # The domains, each a package of services and schemas.
    ("broker.services",),
    ("broker.nodes",),
    ("broker.market",),
    ("broker.jobs",),
    ("broker.allocations",),
    ("broker.billing",),
    ("broker.offers", "broker.blobs"),
    ("broker.accounts",),
    # Matched work; metrics and rate limits (which read the tables); the tables.
    ("broker.ledger",),
    ("broker.ratelimit",),
    ("broker.buckets",),
    ("broker.observability",),
    ("broker.scheduler",),
    ("broker.leases",),
    ("broker.models",),
    # The provider's agent and the SDK, over the portability layer.
    ("broker.agent",),
    ("broker.sdk",),
    ("broker.sandbox",),
    ("broker.portable",),
    # Plumbing every layer may use.
    ("broker.coalesce", "broker.pagination"),
    ("broker.migrate", "broker.db", "broker.limits"),
    ("broker.config", "broker.errors", "broker.logformat"),
    ("broker.money", "broker.types"),
    ("broker.platforms",),
    ("broker",),
)


def _modules() -> dict[str, Path]:
    found = {}
    for top in ("broker", "web"):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


@cache
def layer_of(module: str) -> tuple[int, str]:
    """The module's layer (0 at the top) and the package pattern it matched."""
    for index, patterns in enumerate(LAYERS):
        for pattern in patterns:
            if fnmatchcase(module, pattern) or (
                "*" not in pattern and module.startswith(pattern + ".")
            ):
                return index, pattern
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def imports(module: str) -> set[str]:
    """The broker and web modules ``module`` imports (``from a import b`` of a module b
    counts as importing ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                for a in node.names
            ]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in ("broker", "web")}
    return found


def violations() -> list[str]:
    wrong = []
    for module in sorted(MODULES):
        mine, my_package = layer_of(module)
        for target in sorted(imports(module)):
            theirs, their_package = layer_of(target)
            if theirs < mine:
                wrong.append(f"{module} imports {target}, a layer above it ({their_package})")
            elif theirs == mine and their_package != my_package:
                wrong.append(f"{module} imports {target}, beside it ({their_package})")
    return wrong


def test_imports_run_down_the_layers() -> None:
    assert violations() == []


def test_a_wrong_import_is_caught(monkeypatch) -> None:
    """The check itself: the ledger importing a domain is reported."""
    original = imports

    def with_one_more(module: str) -> set[str]:
        extra = {"broker.jobs.service"} if module == "broker.ledger" else set()
        return original(module) | extra

    monkeypatch.setattr(__import__(__name__, fromlist=["imports"]), "imports", with_one_more)
    assert violations() == [
        "broker.ledger imports broker.jobs.service, a layer above it (broker.jobs)"
    ]


def test_web_and_the_command_line_call_services_not_routes() -> None:
    callers = [m for m in MODULES if m.startswith("web") or m in ("broker.cli", "broker.devcli")]
    wrong = [
        f"{m} imports {t}"
        for m in callers
        for t in imports(m)
        if fnmatchcase(t, "broker.*.router") or t == "broker.shortcuts"
    ]
    assert wrong == []


def test_no_module_imports_itself_round_a_circle() -> None:
    """No circles between modules either (a package importing its own modules aside)."""
    graph = {
        m: {t for t in imports(m) if t in MODULES and not t.startswith(m + ".")} for m in MODULES
    }
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as e:
        raise AssertionError(f"an import circle: {' -> '.join(e.args[1])}") from None
