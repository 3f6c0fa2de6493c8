"""The Kubernetes agent: one process offers a whole cluster's accelerators and runs
the jobs matched to them as Kubernetes Jobs (``broker agent --adapter kubernetes``).

It reads the cluster through the official ``kubernetes`` client: it lists nodes
and pods, and watches both so that offers follow pods as they come and go (a
full list at least every ``refresh_seconds`` besides). Each node with
accelerators is a node of the broker of its own, registered under
``CLUSTER-NODE`` with a node key of its own: one node is one gang, so its free
accelerators are one offer (``adapters.kubernetes`` says what is free and what
model it is).

A matched allocation is started at the broker and becomes a ``batch/v1`` Job on
its node (``broker.agent.kube_jobs``); the runner in the Job's pod
(``broker.agent.pod``) downloads the work, runs it in a sandbox and reports
progress, checkpoints and the result to the broker with the node's key, as
today's agent does. The agent follows the pod: when it fails without the runner
having said how the run ended (evicted, its node gone or not Ready, an image
that cannot be pulled, a pod that is never scheduled), the agent tells the broker
why and hands the job back to the market; when the broker ends the allocation
(the developer cancelled), the agent deletes the Job. Every ended run's Job is
deleted. On the way out the agent deletes its Jobs and signs every node off, so
their jobs resume elsewhere from their last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx

from adapters import kubernetes as kube
from adapters.base import Device
from adapters.registry import offerable_counts
from broker.agent.kube_jobs import job_manifest, job_name, pod_verdict, runner_env
from broker.agent.node import ANY_MODEL, VERSION, AgentStopped, NodeAgent
from broker.sdk.http import BrokerError, BrokerUnavailable
from broker.sdk.provider import ProviderClient

log = logging.getLogger(__name__)


@dataclass
class KubeConfig:
    broker: str
    api_key: str  # the provider's key; each node gets a node key on registering
    cluster: str  # prefix of the broker's node names: CLUSTER-NODE
    region: str
    country: str
    lat: float
    lon: float
    prices: dict[str, Decimal]  # catalog key (or "*") -> USD per accelerator-hour
    namespace: str = "default"
    image: str = "compute-broker:latest"  # an image with the broker installed
    tolerations: tuple[kube.Toleration, ...] = kube.DEFAULT_TOLERATIONS
    service_account: str | None = None  # of the Jobs' pods
    emulated: bool = False  # demos: offers labelled emulated, runs on the pods' CPU
    poll_seconds: float = 2.0
    refresh_seconds: float = 30.0  # a full list of nodes and pods at least this often
    pending_seconds: float = 300.0  # a pod not running after this goes back to the market
    stop_seconds: float = 30.0
    transport: httpx.BaseTransport | None = None  # tests


@dataclass
class _Member:
    """One cluster node, as a node of the broker."""

    node: str
    broker_name: str
    node_id: str
    key: str  # the node key: the runner in its pods reports with it
    client: ProviderClient
    caps: list[kube.NodeCapacity]
    devices: list[Device]
    offers: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Run:
    allocation: str
    member: _Member
    job: str
    created: float
    seen_pod: bool = False


def broker_name(cluster: str, node: str) -> str:
    """The broker's name of a cluster node: ``CLUSTER-NODE``, at most 100 characters."""
    name = f"{cluster}-{node}"
    if len(name) <= 100:
        return name
    return name[:91] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]


class KubeAgent:
    """The agent of one cluster. ``run`` blocks until ``stop`` is set."""

    def __init__(self, config: KubeConfig, api: Any) -> None:
        from kubernetes import client

        self.config = config
        # Any: the agent reads raw JSON (``_preload_content=False``) and sends dicts.
        self.core: Any = client.CoreV1Api(api)
        self.batch: Any = client.BatchV1Api(api)
        self.provider = ProviderClient(config.broker, config.api_key, transport=config.transport)
        self.members: dict[str, _Member] = {}
        self.runs: dict[str, _Run] = {}
        self._offer_owner: dict[str, tuple[_Member, str]] = {}  # offer id -> member, model
        self._done: set[str] = set()
        self._unreported: dict[str, tuple[_Member, str]] = {}  # allocation -> member, error
        self._unpriced: set[str] = set()
        self._changed = threading.Event()
        self._cleaned = False  # the Jobs an earlier agent left are deleted at the first look
        self.heartbeat_seconds = 15.0
        self.timeout_seconds = 60.0

    # -- the cluster ----------------------------------------------------------

    def snapshot(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every node and every pod of the cluster, as the API's JSON."""
        nodes = json.loads(self.core.list_node(_preload_content=False).data)["items"]
        pods = json.loads(self.core.list_pod_for_all_namespaces(_preload_content=False).data)
        return nodes, pods["items"]

    def _watch(self, list_fn: Callable[..., Any], stop: threading.Event) -> None:
        """Mark the cluster changed at each event of ``list_fn``'s watch, for good."""
        from kubernetes import watch

        while not stop.is_set():
            try:
                stream = watch.Watch()
                for _ in stream.stream(list_fn, timeout_seconds=30, deserialize=False):
                    self._changed.set()
                    if stop.is_set():
                        stream.stop()
            except Exception as e:  # the API server restarting, a dropped connection
                log.debug("watch failed (%s); watching again", e)
                stop.wait(2.0)

    def offers(self, caps: list[kube.NodeCapacity]) -> list[dict[str, Any]]:
        counts = offerable_counts(d for cap in caps for d in kube.devices(cap))
        offers = []
        for model, count in sorted(counts.items()):
            price = self.config.prices.get(model, self.config.prices.get(ANY_MODEL))
            if price is None:
                if model not in self._unpriced:
                    self._unpriced.add(model)
                    log.warning("no --price for %s; its accelerators are not offered", model)
                continue
            offer: dict[str, Any] = {
                "accelerator": model,
                "count": count,
                "price_per_hour": str(price),
            }
            if self.config.emulated:
                offer["emulated"] = True
            offers.append(offer)
        return offers

    def reconcile(self) -> None:
        """Read the cluster; bring the broker's nodes and offers in line; follow the runs."""
        nodes, pods = self.snapshot()
        caps = kube.capacities(nodes, pods, self.config.tolerations)
        by_node: dict[str, list[kube.NodeCapacity]] = {}
        for cap in caps:
            by_node.setdefault(cap.node, []).append(cap)
        if not self._cleaned:
            self.cleanup(pods)
            self._cleaned = True
        for name, node_caps in by_node.items():
            try:
                self._sync_member(name, node_caps)
            except BrokerError as e:  # one node the broker refuses must not stop the others
                if _retryable(e):
                    raise
                log.error("node %s: the broker refused it: %s", name, e)
        for name in [n for n in self.members if n not in by_node]:
            why = f"node {name} left the cluster (or no longer has accelerators)"
            self._drop_member(self.members[name], why)
        ready = {str(n["metadata"]["name"]) for n in nodes if kube.ready_problem(n) is None}
        self._follow(pods, ready)

    def _sync_member(self, name: str, caps: list[kube.NodeCapacity]) -> None:
        devices = [d for cap in caps for d in kube.devices(cap)]
        offers = self.offers(caps)
        member = self.members.get(name)
        if member is None:
            member = self._register(name, caps, devices)
            self.members[name] = member
        elif devices != member.devices:
            member.client.heartbeat(member.node_id, {}, NodeAgent.device_reports(devices))
        member.caps, member.devices = caps, devices
        if offers != member.offers:
            self._publish(member, offers)

    def _register(self, name: str, caps: list[kube.NodeCapacity], devices: list[Device]) -> _Member:
        config = self.config
        answer = self.provider.register(
            {
                "name": broker_name(config.cluster, name),
                "region": config.region,
                "country": config.country,
                "lat": config.lat,
                "lon": config.lon,
                "adapters": ["kubernetes"],
                "devices": NodeAgent.device_reports(devices),
                "agent_version": VERSION,
            }
        )
        self.heartbeat_seconds = float(answer["heartbeat_seconds"])
        self.timeout_seconds = float(answer.get("timeout_seconds", 60.0))
        client = ProviderClient(
            config.broker,
            answer["api_key"],
            retry_seconds=self.timeout_seconds,
            transport=config.transport,
        )
        log.info("cluster node %s registered as %s", name, answer["node"]["name"])
        node = answer["node"]
        return _Member(name, node["name"], node["id"], answer["api_key"], client, caps, devices)

    def _publish(self, member: _Member, offers: list[dict[str, Any]]) -> None:
        listed = member.client.publish(member.node_id, offers)
        member.offers = offers
        for offer in listed:
            self._offer_owner[offer["id"]] = (member, offer["accelerator"])
            if offer.get("status") == "suspended":
                log.error("offer %s: %s", offer["id"], offer.get("suspended_reason"))
        log.info(
            "node %s offers %s",
            member.node,
            ", ".join(f"{o['count']} x {o['accelerator']}" for o in offers) or "nothing",
        )

    def _drop_member(self, member: _Member, reason: str) -> None:
        for run in [r for r in self.runs.values() if r.member is member]:
            self._end(run, error=reason)
        try:
            member.client.sign_off(member.node_id)
        except BrokerError as e:
            # Silent, the node goes offline at the broker, which hands its jobs back then.
            log.warning("could not sign node %s off: %s", member.node, e)
        self._forget(member)
        log.info("%s: signed its node off", reason)

    def _forget(self, member: _Member) -> None:
        """No longer act for ``member`` (signing off hands its jobs back anyway)."""
        for allocation in [a for a, (m, _) in self._unreported.items() if m is member]:
            del self._unreported[allocation]
        member.client.close()
        self.members.pop(member.node, None)

    # -- runs -----------------------------------------------------------------

    def take(self, orders: list[dict[str, Any]]) -> int:
        """Start a Job for each new allocation on this cluster's offers."""
        started = 0
        for order in orders:
            allocation = order["allocation_id"]
            owner = self._offer_owner.get(order["offer_id"])
            if owner is None or allocation in self.runs or allocation in self._done:
                continue
            member, model = owner
            cap = next((c for c in member.caps if c.model == model), None)
            if cap is None:
                continue
            try:
                order = member.client.start(allocation)
            except BrokerError as e:
                if _retryable(e):
                    raise
                if e.code != "allocation_ended":
                    log.error("allocation %s: the broker refused to start it: %s", allocation, e)
                self._done.add(allocation)
                continue
            env = runner_env(self.config.broker, member.key, order, self.config.emulated)
            body = job_manifest(
                allocation_id=allocation,
                node=member.node,
                hostname=cap.hostname,
                resource=cap.resource,
                accelerators=int(order["accelerators"]),
                image=self.config.image,
                env=env,
                tolerations=self.config.tolerations,
                service_account=self.config.service_account,
            )
            run = _Run(allocation, member, job_name(allocation), time.monotonic())
            self.runs[allocation] = run
            try:
                self.batch.create_namespaced_job(self.config.namespace, body)
            except Exception as e:
                if getattr(e, "status", None) != 409:  # 409: it exists already
                    self._end(run, error=f"the agent could not create Job {run.job}: {_api(e)}")
                    continue
            log.info("allocation %s runs as Job %s on node %s", allocation, run.job, member.node)
            started += 1
        return started

    def _follow(self, pods: list[dict[str, Any]], ready: set[str]) -> None:
        ours: dict[str, list[Mapping[str, Any]]] = {}
        for pod in pods:
            meta = pod.get("metadata") or {}
            allocation = (meta.get("labels") or {}).get(kube.MANAGED_LABEL)
            if allocation and meta.get("namespace") == self.config.namespace:
                ours.setdefault(allocation, []).append(pod)
        for run in list(self.runs.values()):
            found = sorted(
                ours.get(run.allocation, []),
                key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp", "")),
            )
            waited = time.monotonic() - run.created
            if not found:
                if run.seen_pod:
                    self._end(run, error=f"the pod of Job {run.job} was deleted")
                elif waited > self.config.pending_seconds:
                    self._end(run, error=f"Job {run.job} made no pod within {waited:.0f} s")
                continue
            run.seen_pod = True
            last = found[-1]
            node = (last.get("spec") or {}).get("nodeName")
            verdict = pod_verdict(last, node_ok=node is None or node in ready)
            if verdict.state == "done":
                self._end(run)
            elif verdict.state == "failed":
                self._end(run, error=verdict.reason, retry=verdict.retry)
            elif verdict.state == "pending" and waited > self.config.pending_seconds:
                why = verdict.reason or f"pod of Job {run.job} did not start"
                self._end(run, error=f"{why} within {waited:.0f} s")

    def _end(self, run: _Run, error: str | None = None, retry: bool = True) -> None:
        """The run is over: tell the broker why when the runner could not, delete its Job."""
        self.runs.pop(run.allocation, None)
        self._done.add(run.allocation)
        if error is not None:
            log.warning("allocation %s: %s", run.allocation, error)
            self._report_failure(run.member, run.allocation, error, retry)
        self._delete_job(run.job)

    def _report_failure(self, member: _Member, allocation: str, error: str, retry: bool) -> None:
        try:
            member.client.finish(allocation, "failed", error=error[:4000], retry=retry)
            self._unreported.pop(allocation, None)
        except BrokerError as e:
            if e.code == "allocation_ended" or e.status in (404, 409):
                self._unreported.pop(allocation, None)  # the runner (or the broker) ended it
            elif isinstance(e, BrokerUnavailable) or e.status >= 500:
                self._unreported[allocation] = (member, error)
            else:
                raise

    def _delete_job(self, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(
                name, self.config.namespace, propagation_policy="Background"
            )
        except Exception as e:
            if getattr(e, "status", None) != 404:
                log.warning("could not delete Job %s: %s", name, _api(e))

    def beat(self) -> None:
        """Keep every node online; stop the runs the broker ended; publish again after a
        resync; send failures that could not be reported."""
        for member in list(self.members.values()):
            runs = [r for r in self.runs.values() if r.member is member]
            # The runner reports usage itself; 0 here only asks whether each run still stands.
            try:
                answer = member.client.heartbeat(member.node_id, {r.allocation: 0.0 for r in runs})
            except BrokerError as e:
                if _retryable(e):
                    raise
                # Signed off meanwhile (an operator?): register it afresh at the next look.
                log.error("node %s: heartbeat refused (%s); registering it again", member.node, e)
                for gone in runs:
                    self._end(gone)
                self._forget(member)
                continue
            for allocation in answer["ended"]:
                if ended := self.runs.get(allocation):
                    log.info(
                        "the broker ended allocation %s; deleting Job %s", allocation, ended.job
                    )
                    self._end(ended)
            if answer["resync"]:
                self._publish(member, member.offers)
        for allocation, (member, error) in list(self._unreported.items()):
            self._report_failure(member, allocation, error, True)

    def cleanup(self, pods: list[dict[str, Any]]) -> None:
        """Delete the Jobs an earlier agent left: registering again handed their jobs back."""
        jobs = {
            job_name(labels[kube.MANAGED_LABEL])
            for pod in pods
            if (pod.get("metadata") or {}).get("namespace") == self.config.namespace
            and kube.MANAGED_LABEL in (labels := (pod.get("metadata") or {}).get("labels") or {})
        }
        for name in sorted(jobs):
            log.info("deleting Job %s, left by an earlier agent", name)
            self._delete_job(name)

    # -- the whole life -------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Offer the cluster and run its jobs until ``stop`` is set; then delete the
        Jobs and sign every node off."""
        for list_fn in (self.core.list_node, self.core.list_pod_for_all_namespaces):
            threading.Thread(
                target=self._watch, args=(list_fn, stop), name="kube-watch", daemon=True
            ).start()
        last_refresh = last_beat = -float("inf")
        delay = 1.0
        try:
            while not stop.is_set():
                try:
                    now = time.monotonic()
                    since = now - last_refresh
                    # Every event marks a change; a busy cluster is read at most once a second.
                    if (self._changed.is_set() and since >= 1.0) or (
                        since >= self.config.refresh_seconds
                    ):
                        self._changed.clear()
                        last_refresh = now
                        self.reconcile()
                    if now - last_beat >= self.heartbeat_seconds:
                        last_beat = now
                        self.beat()
                    orders = self.provider.work(wait=self.config.poll_seconds)
                    if not self.take(orders):
                        # Running work answers the poll at once; don't spin on it.
                        stop.wait(self.config.poll_seconds if orders else 0.0)
                    delay = 1.0
                except BrokerError as e:
                    if e.status == 401:
                        raise AgentStopped(
                            f"the broker refused a key ({e}): another agent registered "
                            "this cluster's nodes, or the provider's key was revoked"
                        ) from None
                    if _retryable(e):
                        log.warning("broker unavailable (%s); retrying in %.0f s", e, delay)
                    else:
                        log.error("the broker refused a request: %s", e)
                    stop.wait(delay)
                    delay = min(delay * 2, 30.0)
                except Exception as e:
                    if _is_api_error(e):
                        log.warning(
                            "the cluster's API failed (%s); retrying in %.0f s", _api(e), delay
                        )
                        stop.wait(delay)
                        delay = min(delay * 2, 30.0)
                    else:
                        raise
        finally:
            stop.set()
            self.shutdown()

    def shutdown(self) -> None:
        for run in list(self.runs.values()):
            self._end(run)
        for member in list(self.members.values()):
            try:
                member.client.sign_off(member.node_id)
            except BrokerError as e:
                log.warning("could not sign node %s off (%s)", member.node, e)
            member.client.close()
        self.members.clear()
        self.provider.close()


def _retryable(e: BrokerError) -> bool:
    """The broker is unreachable or failing (5xx), or the key is refused (401): not a
    refusal of one request."""
    return isinstance(e, BrokerUnavailable) or e.status >= 500 or e.status == 401


def _is_api_error(e: Exception) -> bool:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    return isinstance(e, ApiException | HTTPError)


def _api(e: Exception) -> str:
    """The API server's message of an error (its Status body), else the error."""
    body = getattr(e, "body", None)
    if body:
        try:
            status = json.loads(body)
            return f"{status.get('code')} {status.get('reason')}: {status.get('message')}"
        except (ValueError, AttributeError):
            pass
    return str(e)
