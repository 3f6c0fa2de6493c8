"""The fake API server answers the official client as a real one would."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from adapters.kubernetes import DEFAULT_TOLERATIONS
from broker.agent.kube_jobs import job_manifest
from tests.kube.fake_cluster import NODES, FakeCluster, node_named


@pytest.fixture
def cluster() -> Any:
    with FakeCluster([node_named("gke-a3-pool-7f3c9b1e-x2kq")], pull_fails=True) as c:
        yield c


def test_list_watch_create_delete_and_errors(cluster: FakeCluster) -> None:
    api = cluster.api_client()
    core: Any = client.CoreV1Api(api)
    batch: Any = client.BatchV1Api(api)
    nodes = core.list_node()
    assert [n.metadata.name for n in nodes.items] == ["gke-a3-pool-7f3c9b1e-x2kq"]
    assert nodes.items[0].status.allocatable["nvidia.com/gpu"] == "8"

    events: list[tuple[str, str]] = []

    def follow() -> None:
        stream = watch.Watch()
        for event in stream.stream(
            core.list_pod_for_all_namespaces, timeout_seconds=5, deserialize=False
        ):
            events.append((event["type"], event["object"]["status"]["phase"]))
            if len(events) >= 2:
                stream.stop()

    watcher = threading.Thread(target=follow)
    watcher.start()
    body = job_manifest(
        allocation_id="alloc_0123",
        node="gke-a3-pool-7f3c9b1e-x2kq",
        hostname="gke-a3-pool-7f3c9b1e-x2kq",
        resource="nvidia.com/gpu",
        accelerators=2,
        image="compute-broker:test",
        env={"A": "1"},
        tolerations=DEFAULT_TOLERATIONS,
    )
    batch.create_namespaced_job("market", body)
    with pytest.raises(ApiException) as exists:
        batch.create_namespaced_job("market", body)
    assert exists.value.status == 409
    assert json.loads(str(exists.value.body))["reason"] == "AlreadyExists"
    watcher.join(timeout=10)
    assert events[0] == ("ADDED", "Pending")
    (pod,) = core.list_namespaced_pod("market", label_selector="job-name=broker-alloc-0123").items
    assert pod.spec.node_name == "gke-a3-pool-7f3c9b1e-x2kq"
    assert pod.spec.containers[0].resources.limits == {"nvidia.com/gpu": "2"}

    batch.delete_namespaced_job("broker-alloc-0123", "market", propagation_policy="Background")
    assert core.list_namespaced_pod("market").items == []
    with pytest.raises(ApiException) as missing:
        batch.delete_namespaced_job("broker-alloc-0123", "market")
    assert missing.value.status == 404
    assert json.loads(str(missing.value.body))["kind"] == "Status"
    assert len(NODES) > 1
