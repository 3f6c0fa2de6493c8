"""The Kubernetes Job one allocation runs as, and what its pod's status means.

Pure functions over the API's JSON, so that the agent (``broker.agent.kube``)
holds the loop and these hold the rules:

- ``job_manifest``: a ``batch/v1`` Job pinned to one node (a node selector on
  its hostname), asking for the allocation's accelerators as a resource limit,
  tolerating the agent's tolerations, run once (no retries by Kubernetes: the
  broker hands a failed run back to the market itself), its container running
  the broker's runner (``python -m broker.agent.pod``) with the work order in
  its environment;
- ``pod_verdict``: where its pod is (pending, running, done) and, when the run
  ended without the runner saying so, why, and whether the job should go back to
  the market.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adapters.kubernetes import HOSTNAME_LABEL, MANAGED_LABEL, Toleration

MANAGED_BY = ("app.kubernetes.io/managed-by", "compute-broker")
NODE_LABEL = "broker.compute/node"
RUNNER = ["python", "-m", "broker.agent.pod"]
# A pod that waits for these is stuck on the provider's side, not the program's.
_STUCK = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
}
EXIT_UNREPORTED = 75  # the runner's exit status when its finish did not reach the broker


def job_name(allocation_id: str) -> str:
    """A DNS-1123 name for the allocation's Job (ids are ``alloc_<hex>``)."""
    return "broker-" + re.sub(r"[^a-z0-9-]", "-", allocation_id.lower())[:50].strip("-")


def job_manifest(
    *,
    allocation_id: str,
    node: str,
    hostname: str,
    resource: str,
    accelerators: int,
    image: str,
    env: Mapping[str, str],
    tolerations: Sequence[Toleration],
    service_account: str | None = None,
) -> dict[str, Any]:
    """The Job for one allocation on one node."""
    labels = {MANAGED_BY[0]: MANAGED_BY[1], MANAGED_LABEL: allocation_id, NODE_LABEL: node[:63]}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "nodeSelector": {HOSTNAME_LABEL: hostname},
        "tolerations": [t.to_api() for t in tolerations],
        "automountServiceAccountToken": False,  # the run needs no access to the cluster
        "containers": [
            {
                "name": "runner",
                "image": image,
                "command": RUNNER,
                "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
                "resources": {
                    "limits": {resource: str(accelerators)},
                    "requests": {resource: str(accelerators)},
                },
            }
        ],
    }
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(allocation_id), "labels": labels},
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 3600,  # the agent deletes it first; this if it cannot
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def runner_env(
    broker: str, node_key: str, order: Mapping[str, Any], emulate: bool
) -> dict[str, str]:
    """What the runner in the pod reads (``broker.agent.pod``)."""
    return {
        "BROKER_URL": broker,
        "BROKER_NODE_KEY": node_key,
        "BROKER_WORK_ORDER": json.dumps(dict(order), default=str),
        "BROKER_EMULATE": "1" if emulate else "0",
    }


@dataclass(frozen=True, slots=True)
class Verdict:
    """Where a run's pod is. ``state``: ``pending``, ``running``, ``done`` (the runner
    ended and reported itself) or ``failed`` (``reason`` says why; ``retry``: hand
    the job back to the market rather than fail it)."""

    state: str
    reason: str = ""
    retry: bool = True


def pod_verdict(pod: Mapping[str, Any], node_ok: bool = True) -> Verdict:
    """The verdict on one pod of a run; ``node_ok`` False when its node is gone or not Ready."""
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    name = (pod.get("metadata") or {}).get("name", "?")
    node = (pod.get("spec") or {}).get("nodeName")
    if (pod.get("metadata") or {}).get("deletionTimestamp") and phase not in (
        "Succeeded",
        "Failed",
    ):
        return Verdict("failed", f"pod {name} is being deleted")
    if phase == "Succeeded":
        return Verdict("done")
    if phase == "Failed":
        return _failed(name, status)
    if node and not node_ok:
        return Verdict("failed", f"node {node} of pod {name} disappeared or is not Ready")
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _STUCK:
            detail = waiting.get("message") or ""
            return Verdict("failed", f"pod {name}: {waiting['reason']} {detail}".strip())
    if phase == "Running":
        return Verdict("running")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            why = condition.get("message") or condition.get("reason") or "unschedulable"
            return Verdict("pending", f"pod {name} is not scheduled: {why}")
    return Verdict("pending")


def _failed(name: str, status: Mapping[str, Any]) -> Verdict:
    reason, message = status.get("reason") or "", status.get("message") or ""
    if reason == "Evicted":
        return Verdict("failed", f"pod {name} was evicted: {message}".rstrip(": "))
    if reason:  # NodeLost, Shutdown, DeadlineExceeded, Preempting...
        return Verdict("failed", f"pod {name} failed: {reason} {message}".strip())
    for container in status.get("containerStatuses") or []:
        ended = (container.get("state") or {}).get("terminated") or {}
        if not ended:
            continue
        code = ended.get("exitCode")
        if ended.get("reason") == "OOMKilled":
            return Verdict("failed", f"pod {name}: the runner ran out of memory (OOMKilled)", False)
        if code == EXIT_UNREPORTED:
            return Verdict("failed", f"pod {name}: the runner could not reach the broker")
        detail = ended.get("message") or ended.get("reason") or ""
        return Verdict("failed", f"pod {name}: the runner exited with {code} {detail}".strip())
    return Verdict("failed", f"pod {name} failed")
