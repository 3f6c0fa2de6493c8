"""The Job an allocation runs as, and what its pod's status says about the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from adapters.kubernetes import DEFAULT_TOLERATIONS, MANAGED_LABEL, Toleration
from broker.agent.kube_jobs import (
    EXIT_UNREPORTED,
    job_manifest,
    job_name,
    pod_verdict,
    runner_env,
)


def test_the_job_is_pinned_to_its_node_and_asks_for_its_accelerators() -> None:
    env = runner_env("http://broker:8000", "bk_node", {"allocation_id": "alloc_ab12"}, False)
    job = job_manifest(
        allocation_id="alloc_ab12",
        node="gke-tpu-v5e-pool-1a2b3c4d-9xyz",
        hostname="gke-tpu-v5e-pool-1a2b3c4d-9xyz",
        resource="google.com/tpu",
        accelerators=8,
        image="registry.example/compute-broker:0.1.0",
        env=env,
        tolerations=(*DEFAULT_TOLERATIONS, Toleration.parse("dedicated=ml:NoSchedule")),
        service_account="broker-runner",
    )
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert job["metadata"]["name"] == job_name("alloc_ab12") == "broker-alloc-ab12"
    assert job["spec"]["backoffLimit"] == 0  # the broker retries, elsewhere
    pod = job["spec"]["template"]["spec"]
    assert job["spec"]["template"]["metadata"]["labels"][MANAGED_LABEL] == "alloc_ab12"
    assert pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {"kubernetes.io/hostname": "gke-tpu-v5e-pool-1a2b3c4d-9xyz"}
    assert pod["serviceAccountName"] == "broker-runner"
    assert pod["automountServiceAccountToken"] is False
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in (
        pod["tolerations"]
    )
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/compute-broker:0.1.0"
    assert container["resources"]["limits"] == {"google.com/tpu": "8"}
    values = {e["name"]: e["value"] for e in container["env"]}
    assert json.loads(values["BROKER_WORK_ORDER"]) == {"allocation_id": "alloc_ab12"}
    assert values["BROKER_NODE_KEY"] == "bk_node"


def _pod(phase: str, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "broker-alloc-1-x7k2p"},
        "spec": {"nodeName": "n1"},
        "status": {"phase": phase, **status},
    }


def _terminated(code: int, reason: str) -> dict[str, Any]:
    return {"containerStatuses": [{"state": {"terminated": {"exitCode": code, "reason": reason}}}]}


@pytest.mark.parametrize(
    ("pod", "node_ok", "state", "words", "retry"),
    [
        (_pod("Pending"), True, "pending", "", True),
        (_pod("Running"), True, "running", "", True),
        (_pod("Succeeded"), True, "done", "", True),
        (_pod("Running"), False, "failed", "node n1 of pod broker-alloc-1-x7k2p disappeared", True),
        (
            _pod("Failed", reason="Evicted", message="The node was low on resource: memory."),
            True,
            "failed",
            "was evicted: The node was low on resource: memory.",
            True,
        ),
        (
            _pod("Failed", reason="NodeLost", message="node n1 is unreachable"),
            True,
            "failed",
            "NodeLost",
            True,
        ),
        (_pod("Failed", **_terminated(137, "OOMKilled")), True, "failed", "OOMKilled", False),
        (
            _pod("Failed", **_terminated(EXIT_UNREPORTED, "Error")),
            True,
            "failed",
            "could not reach",
            True,
        ),
        (_pod("Failed", **_terminated(1, "Error")), True, "failed", "exited with 1 Error", True),
        (
            _pod(
                "Pending",
                containerStatuses=[
                    {"state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}}
                ],
            ),
            True,
            "failed",
            "ErrImagePull not found",
            True,
        ),
        (
            _pod(
                "Pending",
                conditions=[
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                    }
                ],
            ),
            True,
            "pending",
            "Insufficient nvidia.com/gpu",
            True,
        ),
    ],
)
def test_pod_verdicts(
    pod: dict[str, Any], node_ok: bool, state: str, words: str, retry: bool
) -> None:
    verdict = pod_verdict(pod, node_ok)
    assert verdict.state == state
    assert words in verdict.reason
    assert verdict.retry == retry


def test_a_pod_being_deleted_is_over() -> None:
    pod = _pod("Running")
    pod["metadata"]["deletionTimestamp"] = "2026-12-03T11:00:00Z"
    assert pod_verdict(pod).state == "failed"


def test_the_runner_refuses_a_pod_without_its_work_order() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    done = subprocess.run(
        [sys.executable, "-m", "broker.agent.pod"],
        env={**env, "BROKER_URL": "http://127.0.0.1:9", "BROKER_NODE_KEY": "bk_x"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "BROKER_WORK_ORDER" in done.stderr
