"""The cluster agent against a fake cluster and a live broker: it offers each node's
free accelerators, runs matched jobs as Kubernetes Jobs whose pods run the broker's
runner for real, and hands jobs back when pods are evicted or nodes disappear."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sqlalchemy import Engine

from adapters.kubernetes import MANAGED_LABEL
from broker.agent.kube import KubeAgent, KubeConfig
from broker.agent.node import parse_prices
from broker.config import get_settings
from broker.db import transaction
from broker.market.clearing import run_round
from broker.models.account import Role
from broker.sdk import Client
from tests.factories import make_account
from tests.kube.fake_cluster import NODES, FakeCluster, node_named

H100 = "gke-a3-pool-7f3c9b1e-x2kq"


def _wait(check: Any, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.1)
    raise AssertionError("timed out")


def slow_step(state: tuple[Any, Any], m: Any) -> tuple[Any, Any]:
    w, count = state
    return jax.lax.fori_loop(0, 4, lambda _, w: jnp.tanh(w @ m), w), count + 1


@pytest.fixture
def market(
    live_url: str, fresh_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, Any]]:
    # Emulated offers: the fake cluster's "GPUs" run the jobs on this machine's CPU.
    monkeypatch.setenv("BROKER_ALLOW_EMULATION", "1")
    monkeypatch.setenv("BROKER_NODE_TIMEOUT_S", "4")  # heartbeats every second
    get_settings.cache_clear()
    with transaction(fresh_engine) as session:
        _, dev_key = make_account(session, Role.developer)
        _, prov_key = make_account(session, Role.provider)
    with Client(live_url, dev_key, retries=1) as developer:
        yield {"url": live_url, "key": prov_key, "engine": fresh_engine, "developer": developer}
    get_settings.cache_clear()


class Running:
    """An agent running in a thread of the test."""

    def __init__(self, market: dict[str, Any], cluster: FakeCluster, **options: Any) -> None:
        config = KubeConfig(
            broker=market["url"],
            api_key=market["key"],
            cluster="lab",
            region="us-central1",
            country="US",
            lat=41.26,
            lon=-95.86,
            prices=parse_prices(["*=2.00"]),
            namespace="market",
            image="compute-broker:test",
            poll_seconds=0.3,
            refresh_seconds=1.0,
            **options,
        )
        self.agent = KubeAgent(config, cluster.api_client())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.agent.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


def offers(developer: Client) -> dict[str, tuple[str, int]]:
    items = developer.http.json("GET", "/v1/offers", params={"limit": 100})["items"]
    nodes = {o["node_id"]: o for o in items}
    return {node: (o["accelerator"], o["count"]) for node, o in nodes.items()}


def by_name(agent: KubeAgent) -> dict[str, str]:
    return {m.node_id: m.node for m in agent.members.values()}


def test_each_node_is_one_offer_and_offers_follow_pods(market: dict[str, Any]) -> None:
    developer: Client = market["developer"]
    with FakeCluster(NODES) as cluster:
        running = Running(market, cluster)
        try:

            def listed() -> dict[str, tuple[str, int]]:
                names = by_name(running.agent)
                return {names.get(k, k): v for k, v in offers(developer).items()}

            expected = {
                "dgx-a100-01": ("a100-80gb", 6),
                H100: ("h100-sxm", 8),
                "ip-10-0-12-34.ec2.internal": ("h100-sxm", 8),
                "mi300x-node-0": ("mi300x", 8),
                "gke-tpu-v5e-pool-1a2b3c4d-9xyz": ("tpu-v5e", 8),
            }
            _wait(lambda: listed() == expected)
            # Cordoned, tainted and not-Ready nodes are nodes of the broker, offering nothing.
            assert set(running.agent.members) == {
                *expected,
                "gpu-cordoned",
                "gpu-reserved",
                "gpu-notready",
            }
            nodes = developer.http.json("GET", "/v1/offers")["items"]
            assert all(o["region"] == "us-central1" for o in nodes)

            cluster.add_pod("training", H100, {"nvidia.com/gpu": "3"})
            _wait(lambda: listed()[H100] == ("h100-sxm", 5))
            cluster.remove("pods", "other", "training")
            _wait(lambda: listed()[H100] == ("h100-sxm", 8))
        finally:
            running.close()
        assert offers(developer) == {}  # signed off: every offer withdrawn


def test_a_matched_job_runs_as_a_kubernetes_job(market: dict[str, Any]) -> None:
    developer: Client = market["developer"]
    with FakeCluster([node_named(H100)]) as cluster:
        running = Running(market, cluster, emulated=True)
        try:
            _wait(lambda: offers(developer))
            x = jnp.arange(6.0)
            job = developer.submit(
                lambda v: jnp.sin(v) * 2, x, platforms=("cpu", "cuda"), max_price_per_hour=3
            )
            run_round(market["engine"], get_settings(), "manual")
            (allocation,) = _wait(lambda: list(running.agent.runs))
            (pod,) = _wait(lambda: cluster.pods_of(allocation))
            spec = pod["spec"]
            assert spec["nodeSelector"] == {"kubernetes.io/hostname": H100}
            assert spec["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
            assert spec["containers"][0]["command"] == ["python", "-m", "broker.agent.pod"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists"} in spec["tolerations"]
            done = job.wait(timeout=120, poll=0.2, progress=False)
            np.testing.assert_allclose(done.result(), np.sin(np.arange(6.0)) * 2, rtol=1e-6)
            assert done.data["state"] == "succeeded"
            # The run is over: its Job (and pod) are deleted.
            _wait(lambda: not cluster.items("jobs") and not cluster.pods_of(allocation))
            assert not running.agent.runs
            # Everything the agent asked of the cluster is in the RBAC the docs give it.
            assert {rbac(method, path) for method, path in cluster.requests} == {
                ("nodes", "list"),  # list and watch
                ("pods", "list"),
                ("jobs", "create"),
                ("jobs", "delete"),
            }
        finally:
            running.close()


def rbac(method: str, path: str) -> tuple[str, str]:
    """The resource and verb of a request, for the agent's RBAC (its jobs in "market")."""
    if path.startswith("/apis/batch/v1/namespaces/market/jobs"):
        return "jobs", {"POST": "create", "DELETE": "delete"}[method]
    assert method == "GET", path
    return {"/api/v1/nodes": ("nodes", "list"), "/api/v1/pods": ("pods", "list")}[path]


def _long_job(developer: Client) -> Any:
    return developer.submit(
        slow_step,
        (jnp.ones((64, 64)), jnp.int32(0)),
        jnp.eye(64) * 0.5,
        steps=1_000_000,
        checkpoint_every=20,
        platforms=("cpu", "cuda"),
        max_price_per_hour=3,
    )


def _running_pod(
    market: dict[str, Any], cluster: FakeCluster, running: Running
) -> tuple[Any, dict[str, Any]]:
    developer: Client = market["developer"]
    _wait(lambda: offers(developer))
    job = _long_job(developer)
    run_round(market["engine"], get_settings(), "manual")
    _wait(lambda: job.refresh().data["checkpoint_step"] >= 20, timeout=120)
    (allocation,) = list(running.agent.runs)
    (pod,) = cluster.pods_of(allocation)
    return job, pod


def test_an_evicted_pod_hands_its_job_back_with_the_reason(market: dict[str, Any]) -> None:
    with FakeCluster([node_named(H100)]) as cluster:
        running = Running(market, cluster, emulated=True)
        try:
            job, pod = _running_pod(market, cluster, running)
            cluster.evict(pod["metadata"]["name"], "market")
            back = _wait(lambda: job.refresh().data["state"] == "open" and job.data)
            assert "was evicted" in back["error"]
            assert "low on resource: memory" in back["error"]
            assert back["checkpoint_step"] >= 20  # it resumes from there elsewhere
            _wait(lambda: not cluster.items("jobs"))
        finally:
            running.close()


def test_a_node_that_disappears_hands_its_jobs_back_and_signs_off(market: dict[str, Any]) -> None:
    developer: Client = market["developer"]
    with FakeCluster([node_named(H100), node_named("mi300x-node-0")]) as cluster:
        running = Running(market, cluster, emulated=True)
        try:
            job, _ = _running_pod(market, cluster, running)
            cluster.remove_node(H100)
            back = _wait(lambda: job.refresh().data["state"] == "open" and job.data)
            assert f"node {H100} left the cluster" in back["error"]
            names = by_name(running.agent)
            _wait(lambda: [names.get(n) for n in offers(developer)] == ["mi300x-node-0"])
            assert H100 not in running.agent.members
            _wait(lambda: not cluster.items("jobs"))
        finally:
            running.close()


def test_a_node_that_stops_being_ready_hands_its_jobs_back(market: dict[str, Any]) -> None:
    developer: Client = market["developer"]
    with FakeCluster([node_named(H100)]) as cluster:
        running = Running(market, cluster, emulated=True)
        try:
            job, _ = _running_pod(market, cluster, running)
            cluster.set_not_ready(H100)
            back = _wait(lambda: job.refresh().data["state"] == "open" and job.data)
            assert f"node {H100} of pod" in back["error"]
            assert "not Ready" in back["error"]
            _wait(lambda: not cluster.items("jobs"))
            _wait(lambda: offers(developer) == {})  # nothing offered on a node not Ready
            assert H100 in running.agent.members  # still a node of the broker
        finally:
            running.close()


def test_a_cancelled_job_has_its_kubernetes_job_deleted(market: dict[str, Any]) -> None:
    with FakeCluster([node_named(H100)]) as cluster:
        running = Running(market, cluster, emulated=True)
        try:
            job, _ = _running_pod(market, cluster, running)
            job.cancel()
            _wait(lambda: not cluster.items("jobs") and not cluster.items("pods"))
            assert job.refresh().data["state"] == "cancelled"
            assert not running.agent.runs
        finally:
            running.close()


@pytest.mark.parametrize("trouble", ["quota", "pull"])
def test_a_job_kubernetes_cannot_run_goes_back_with_why(
    market: dict[str, Any], trouble: str
) -> None:
    developer: Client = market["developer"]
    with FakeCluster([node_named(H100)], pull_fails=trouble == "pull") as cluster:
        if trouble == "quota":
            cluster.refuse_jobs = (
                "exceeded quota: gpu, requested: nvidia.com/gpu=1, limited: nvidia.com/gpu=0"
            )
        running = Running(market, cluster, emulated=True)
        try:
            _wait(lambda: offers(developer))
            job = developer.submit(
                lambda v: v + 1, jnp.zeros(3), platforms=("cpu", "cuda"), max_price_per_hour=3
            )
            run_round(market["engine"], get_settings(), "manual")
            back = _wait(lambda: job.refresh().data["error"] and job.data)
            assert back["state"] == "open"
            if trouble == "quota":
                assert "403 Forbidden" in back["error"]
                assert "exceeded quota" in back["error"]
            else:
                assert "ImagePullBackOff" in back["error"]
                assert "compute-broker:test" in back["error"]
            _wait(lambda: not cluster.items("jobs"))
        finally:
            running.close()


def test_jobs_an_earlier_agent_left_are_deleted(market: dict[str, Any]) -> None:
    with FakeCluster([node_named(H100)], pull_fails=True) as cluster:
        cluster.create_job(
            "market",
            {
                "metadata": {"name": "broker-alloc-old", "labels": {MANAGED_LABEL: "alloc_old"}},
                "spec": {
                    "template": {
                        "metadata": {"labels": {MANAGED_LABEL: "alloc_old"}},
                        "spec": {
                            "nodeSelector": {"kubernetes.io/hostname": H100},
                            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                            "containers": [{"name": "runner", "image": "x", "command": ["true"]}],
                        },
                    }
                },
            },
        )
        running = Running(market, cluster)
        try:
            _wait(lambda: not cluster.items("jobs"))
        finally:
            running.close()
