"""placeholder"""

import json
from pathlib import Path
from typing import Any

NODES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "samples" / "nodes.json").read_text()
)["items"]


def node_named(name: str) -> dict[str, Any]:
    return next(n for n in NODES if n["metadata"]["name"] == name)
