"""The container image and the Kubernetes manifests: checked here without a cluster,
built and smoke-tested when a Docker daemon answers."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from broker.cli import app as cli
from broker.config import Settings
from tests.replicas.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
KUBERNETES = "1.30.0"  # the oldest Kubernetes the manifests are meant for


def manifests() -> dict[str, dict[str, Any]]:
    """Every resource, by kind (each kind appears once)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in found, f"{doc['kind']} twice"
            found[doc["kind"]] = doc
    return found


@pytest.mark.parametrize("path", sorted(MANIFESTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_is_valid_against_the_kubernetes_schema(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc.get("kind") == "Kustomization":
            listed = set(doc["resources"])
            present = {p.name for p in MANIFESTS.glob("*.yaml")} - {path.name}
            # The Secret is made by the operator, never applied from the repository.
            assert listed == present - {"secret.example.yaml"}
            continue
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def _container(spec: dict[str, Any]) -> dict[str, Any]:
    containers = spec["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def test_the_deployment_runs_replicas_with_probes_resources_and_secrets() -> None:
    found = manifests()
    deployment, service = found["Deployment"], found["Service"]
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    broker = _container(deployment["spec"])
    assert broker["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert broker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert broker["resources"]["requests"]["cpu"]
    assert broker["resources"]["requests"]["memory"]
    # The Service reaches the pods by their labels, on the port the container names.
    labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == broker["ports"][0]["name"]
    # Secrets come from the one Secret, under keys its example defines.
    secret = found["Secret"]
    refs = {
        (e["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for c in (broker, _container(found["Job"]["spec"]))
        for e in c.get("env", [])
        if "valueFrom" in e
    }
    assert {key for _, key in refs} <= set(secret["stringData"])
    names = {name for name, _ in refs}
    assert {"BROKER_DATABASE_URL", "BROKER_SECRET_KEY", "BROKER_STRIPE_API_KEY"} <= names


def test_every_setting_the_manifests_set_exists() -> None:
    found = manifests()
    fields = set(Settings.model_fields)
    names = set(found["ConfigMap"]["data"])
    for kind in ("Deployment", "Job"):
        names |= {e["name"] for e in _container(found[kind]["spec"]).get("env", [])}
    for name in names:
        assert name.startswith("BROKER_"), name
        assert name.removeprefix("BROKER_").lower() in fields, f"{name} is not a setting"
    Settings.model_validate(  # and the ConfigMap's values are valid
        {k.removeprefix("BROKER_").lower(): v for k, v in found["ConfigMap"]["data"].items()}
    )


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_the_containers_run_real_commands(kind: str) -> None:
    args = _container(manifests()[kind]["spec"])["args"]
    result = CliRunner().invoke(cli, [*args, "--help"])
    assert result.exit_code == 0, result.output


def test_the_dockerfile_is_multi_stage_small_and_unprivileged() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert len(stages) >= 2
    assert all("slim" in s for s in stages)
    user = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert user
    assert not user[-1].startswith(("root", "0"))
    assert 'ENTRYPOINT ["broker"]' in text
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = [line for line in lines if line and not line.startswith("#")]
    assert ignored[0] == "*"  # nothing goes to the build unless listed: no .venv, no var/


def _docker_unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "docker is not installed"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        return f"no Docker daemon answers: {info.stderr.strip()[:200]}"
    return None


def test_the_image_builds_serves_and_runs_the_agent(tmp_path: Path) -> None:
    reason = _docker_unavailable()
    if reason:
        pytest.skip(f"the image is built only where Docker runs ({reason})")
    tag = f"compute-broker-test:{uuid.uuid4().hex[:8]}"
    docker = ["docker"]
    subprocess.run([*docker, "build", "-t", tag, str(ROOT)], check=True, timeout=1800)
    port = free_port()
    name = f"broker-{uuid.uuid4().hex[:8]}"
    try:
        user = subprocess.run(
            [*docker, "run", "--rm", "--entrypoint", "id", tag, "-u"],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout.strip()
        assert user != "0"
        agent = subprocess.run(
            [*docker, "run", "--rm", tag, "agent", "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert agent.returncode == 0, agent.stderr
        subprocess.run(
            [*docker, "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", tag],
            check=True,
            timeout=120,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the container did not become ready"
            time.sleep(1)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"http://127.0.0.1:{port}/docs").status_code == 200
    finally:
        subprocess.run([*docker, "rm", "-f", name], capture_output=True, timeout=60)
        subprocess.run([*docker, "rmi", "-f", tag], capture_output=True, timeout=60)
