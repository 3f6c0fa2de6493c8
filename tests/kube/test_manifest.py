"""The example manifest gives the agent the RBAC the tests show it needs, and no more."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MANIFEST = Path(__file__).parents[2] / "deploy" / "kubernetes-agent" / "agent.yaml"


def test_the_manifest_grants_what_the_agent_uses() -> None:
    docs: dict[str, Any] = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}
    cluster_rules = docs["ClusterRole"]["rules"]
    assert cluster_rules == [
        {"apiGroups": [""], "resources": ["nodes", "pods"], "verbs": ["get", "list", "watch"]}
    ]
    role = docs["Role"]
    assert role["metadata"]["namespace"] == "compute-broker"
    assert role["rules"] == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "delete"]}
    ]
    deployment = docs["Deployment"]["spec"]
    assert deployment["replicas"] == 1  # a second agent would revoke the first one's keys
    (container,) = deployment["template"]["spec"]["containers"]
    assert container["command"][:4] == ["broker", "agent", "--adapter=kubernetes", "--in-cluster"]
    assert "--namespace=compute-broker" in container["command"]
