"""``broker agent --adapter kubernetes``: refusals a provider can act on, and a whole
run of the command against the fake cluster through a kubeconfig file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from broker.db import transaction
from broker.models.account import Role
from broker.sdk import Client
from tests.factories import make_account
from tests.kube.fake_cluster import FakeCluster, node_named

WHERE = ("--country", "US", "--lat", "41.26", "--lon", "-95.86")


def _env(key: str = "bk_not_a_real_key") -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return {**clean, "BROKER_API_KEY": key}


def _agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", "agent", "--adapter", "kubernetes", *WHERE, *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_refusals_are_one_line(tmp_path: Path) -> None:
    both = _agent("--kubeconfig", str(tmp_path / "k"), "--in-cluster")
    assert both.returncode == 2
    assert "--kubeconfig or --in-cluster, not both" in both.stderr
    missing = _agent("--kubeconfig", str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert "cannot reach the cluster through" in missing.stderr
    bad = _agent("--toleration", "=x")
    assert bad.returncode == 2
    assert "KEY[=VALUE][:EFFECT]" in bad.stderr
    for refused in (both, missing, bad):
        assert "Traceback" not in refused.stderr


def _kubeconfig(path: Path, server: str) -> Path:
    # JSON is YAML: what kubectl config view --raw -o json prints.
    config: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "lab", "cluster": {"server": server}}],
        "users": [{"name": "agent", "user": {"token": "not-checked"}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "agent"}}],
        "current-context": "lab",
    }
    path.write_text(json.dumps(config))
    return path


def test_the_command_offers_the_cluster_and_signs_off_on_sigterm(
    live_url: str, fresh_engine: Engine, tmp_path: Path
) -> None:
    with transaction(fresh_engine) as session:
        _, dev_key = make_account(session, Role.developer)
        _, prov_key = make_account(session, Role.provider)
    with FakeCluster([node_named("mi300x-node-0")]) as cluster:
        config = _kubeconfig(tmp_path / "kubeconfig", cluster.url)
        agent = subprocess.Popen(
            [
                sys.executable, "-m", "broker.cli", "agent", "--adapter", "kubernetes",
                *WHERE, "--broker", live_url, "--kubeconfig", str(config),
                "--name", "lab", "--namespace", "market", "--price", "mi300x=3.10",
            ],
            env=_env(prov_key),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            with Client(live_url, dev_key, retries=1) as developer:
                deadline = time.monotonic() + 60
                items: list[dict[str, Any]] = []
                while not items and time.monotonic() < deadline:
                    items = developer.http.json("GET", "/v1/offers")["items"]
                    time.sleep(0.2)
                assert [(o["accelerator"], o["count"], o["price_per_hour"]) for o in items] == [
                    ("mi300x", 8, "3.10")
                ]
                agent.send_signal(signal.SIGTERM)
                _, stderr = agent.communicate(timeout=60)
                assert agent.returncode == 0, stderr
                assert "cluster node mi300x-node-0 registered as lab-mi300x-node-0" in stderr
                assert developer.http.json("GET", "/v1/offers")["total"] == 0
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.communicate()
