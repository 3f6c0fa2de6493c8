"""A Kubernetes API server for the tests, on 127.0.0.1: nodes, pods and jobs.

It speaks enough of the API for the official client: list (with label
selectors), watch (chunked JSON lines of events, from a resourceVersion or with
the current objects first), create and delete jobs, and errors as ``Status``
objects with the right codes. A small Job controller makes one pod per Job and
schedules it by the pod's node selector (cordoned, not Ready and untolerated
nodes refuse it); a small kubelet "runs" a scheduled pod by starting its
container's command as a local process, with the container's environment, so
the broker's runner really runs; its exit status decides the pod's phase.
Tests evict pods, take nodes away and make pulls fail through methods here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

ROOT = Path(__file__).resolve().parents[2]
NODES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "samples" / "nodes.json").read_text()
)["items"]
KINDS = {"nodes": ("v1", "Node"), "pods": ("v1", "Pod"), "jobs": ("batch/v1", "Job")}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_named(name: str) -> dict[str, Any]:
    """One node of ``samples/nodes.json``."""
    return copy.deepcopy(next(n for n in NODES if n["metadata"]["name"] == name))


def status(code: int, reason: str, message: str, kind: str = "", name: str = "") -> dict[str, Any]:
    """An API error as the API server writes it."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {"name": name, "kind": kind},
        "code": code,
    }


def _matches(obj: dict[str, Any], selector: str | None) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (selector or "").split(",")):
        key, sep, value = term.partition("=")
        if sep and labels.get(key) != value:
            return False
        if not sep and key not in labels:
            return False
    return True


class FakeCluster:
    """The cluster's state, its API server, its Job controller and its kubelet."""

    def __init__(self, nodes: list[dict[str, Any]], *, pull_fails: bool = False) -> None:
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in KINDS}
        self.events: list[tuple[int, str, str, dict[str, Any]]] = []
        self.version = 100
        self.cond = threading.Condition()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.pull_fails = pull_fails
        self.refuse_jobs: str | None = None  # a quota message: creating jobs is forbidden
        self.requests: list[tuple[str, str]] = []
        self.closing = False
        for node in nodes:
            self.put("nodes", copy.deepcopy(node))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    # -- lifecycle ------------------------------------------------------------

    def __enter__(self) -> FakeCluster:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        for process in list(self.processes.values()):
            _kill(process)
        self.server.shutdown()
        self.server.server_close()

    def api_client(self) -> Any:
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return client.ApiClient(configuration)

    # -- the store ------------------------------------------------------------

    def put(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        with self.cond:
            meta = obj.setdefault("metadata", {})
            key = (meta.get("namespace", ""), meta["name"])
            event = "MODIFIED" if key in self.objects[kind] else "ADDED"
            self.version += 1
            meta["resourceVersion"] = str(self.version)
            meta.setdefault("uid", secrets.token_hex(8))
            meta.setdefault("creationTimestamp", _now())
            obj["apiVersion"], obj["kind"] = KINDS[kind]
            self.objects[kind][key] = obj
            self.events.append((self.version, kind, event, copy.deepcopy(obj)))
            self.cond.notify_all()
            return obj

    def remove(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.cond:
            obj = self.objects[kind].pop((namespace, name), None)
            if obj is not None:
                self.version += 1
                obj["metadata"]["resourceVersion"] = str(self.version)
                self.events.append((self.version, kind, "DELETED", copy.deepcopy(obj)))
                self.cond.notify_all()
            return obj

    def get(self, kind: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        with self.cond:
            obj = self.objects[kind].get((namespace, name))
            return copy.deepcopy(obj) if obj else None

    def items(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        with self.cond:
            return [
                copy.deepcopy(o)
                for (ns, _), o in sorted(self.objects[kind].items())
                if namespace is None or ns == namespace
            ]

    def pods_of(self, allocation: str) -> list[dict[str, Any]]:
        return [
            p
            for p in self.items("pods")
            if (p["metadata"].get("labels") or {}).get("broker.compute/allocation") == allocation
        ]

    # -- what tests do to the cluster ----------------------------------------

    def add_pod(
        self, name: str, node: str, requests: dict[str, str], phase: str = "Running"
    ) -> None:
        """Someone else's pod on ``node``, holding ``requests``."""
        self.put(
            "pods",
            {
                "metadata": {"name": name, "namespace": "other"},
                "spec": {
                    "nodeName": node,
                    "containers": [{"name": "main", "resources": {"limits": requests}}],
                },
                "status": {"phase": phase},
            },
        )

    def evict(self, pod_name: str, namespace: str) -> None:
        """The kubelet evicts the pod: its process dies, the pod fails as Evicted."""
        pod = self.get("pods", pod_name, namespace)
        assert pod is not None
        self._stop_process(f"{namespace}/{pod_name}")
        pod["status"].update(
            phase="Failed",
            reason="Evicted",
            message="The node was low on resource: memory. Threshold quantity: 100Mi.",
        )
        self.put("pods", pod)

    def set_not_ready(self, name: str) -> None:
        """The node's kubelet stops posting status: Ready turns Unknown."""
        node = self.get("nodes", name)
        assert node is not None
        for condition in node["status"]["conditions"]:
            if condition["type"] == "Ready":
                condition.update(status="Unknown", reason="NodeStatusUnknown")
        self.put("nodes", node)

    def remove_node(self, name: str) -> None:
        """The node is gone (deleted, its machine lost): its pods' processes with it."""
        for pod in self.items("pods"):
            if pod["spec"].get("nodeName") == name:
                self._stop_process(f"{pod['metadata']['namespace']}/{pod['metadata']['name']}")
        self.remove("nodes", "", name)

    # -- the job controller and the kubelet -----------------------------------

    def create_job(self, namespace: str, job: dict[str, Any]) -> dict[str, Any]:
        job["metadata"]["namespace"] = namespace
        job.setdefault("status", {})
        job = self.put("jobs", job)
        template = copy.deepcopy(job["spec"]["template"])
        name = job["metadata"]["name"]
        labels = {**(template.get("metadata") or {}).get("labels", {}), "job-name": name}
        pod = {
            "metadata": {
                "name": f"{name}-{secrets.token_hex(3)[:5]}",
                "namespace": namespace,
                "labels": labels,
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": name,
                        "uid": job["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": template["spec"],
            "status": {"phase": "Pending"},
        }
        node = self._schedule(pod)
        if node is None:
            pod["status"]["conditions"] = [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/1 nodes are available: 1 node(s) didn't match node selector.",
                }
            ]
            self.put("pods", pod)
        else:
            pod["spec"]["nodeName"] = node
            pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "True"}]
            self.put("pods", pod)
            threading.Thread(target=self._kubelet, args=(pod,), daemon=True).start()
        return job

    def delete_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        job = self.remove("jobs", namespace, name)
        if job is not None:  # background propagation: its pods go too
            for pod in self.items("pods", namespace):
                if pod["metadata"]["labels"].get("job-name") == name:
                    self._stop_process(f"{namespace}/{pod['metadata']['name']}")
                    self.remove("pods", namespace, pod["metadata"]["name"])
        return job

    def _schedule(self, pod: dict[str, Any]) -> str | None:
        selector = pod["spec"].get("nodeSelector") or {}
        tolerated = pod["spec"].get("tolerations") or []
        for node in self.items("nodes"):
            labels = node["metadata"].get("labels") or {}
            if any(labels.get(k) != v for k, v in selector.items()):
                continue
            if node["spec"].get("unschedulable"):
                continue
            taints = [
                t
                for t in node["spec"].get("taints") or []
                if t["effect"] in ("NoSchedule", "NoExecute")
                and not any(x.get("key") in (t["key"], None) for x in tolerated)
            ]
            ready = any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in node["status"].get("conditions", [])
            )
            if not taints and ready:
                return str(node["metadata"]["name"])
        return None

    def _kubelet(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        container = pod["spec"]["containers"][0]
        time.sleep(0.05)
        current = self.get("pods", meta["name"], meta["namespace"])
        if current is None:
            return
        if self.pull_fails:
            waiting = {
                "reason": "ImagePullBackOff",
                "message": f'Back-off pulling image "{container["image"]}"',
            }
            current["status"]["containerStatuses"] = [_container(container, {"waiting": waiting})]
            self.put("pods", current)
            return
        command = list(container["command"])
        if command[0] == "python":
            command[0] = sys.executable
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
        env.update({e["name"]: e["value"] for e in container.get("env") or []})
        env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
        process = subprocess.Popen(  # the container's entry, run here
            command, cwd=ROOT, env=env, start_new_session=True
        )
        self.processes[key] = process
        current["status"].update(
            phase="Running",
            startTime=_now(),
            containerStatuses=[_container(container, {"running": {"startedAt": _now()}})],
        )
        self.put("pods", current)
        code = process.wait()
        if self.processes.pop(key, None) is None:
            return  # evicted, deleted or its node lost: someone else says what became of it
        current = self.get("pods", meta["name"], meta["namespace"])
        if current is None:
            return
        reason = "Completed" if code == 0 else "Error"
        current["status"].update(
            phase="Succeeded" if code == 0 else "Failed",
            containerStatuses=[
                _container(container, {"terminated": {"exitCode": code, "reason": reason}})
            ],
        )
        self.put("pods", current)

    def _stop_process(self, key: str) -> None:
        process = self.processes.pop(key, None)
        if process is not None:
            _kill(process)

    # -- watches --------------------------------------------------------------

    def watch(
        self,
        kind: str,
        namespace: str | None,
        selector: str | None,
        since: str | None,
        timeout: float,
    ) -> Iterator[dict[str, Any]]:
        """Events of ``kind``: after resourceVersion ``since``, else the objects now first."""
        deadline = time.monotonic() + timeout
        with self.cond:
            if since:
                position = next(
                    (i for i, e in enumerate(self.events) if e[0] > int(since)), len(self.events)
                )
                pending: list[dict[str, Any]] = []
            else:
                position = len(self.events)
                pending = [{"type": "ADDED", "object": o} for o in self.items(kind, namespace)]
        yield from (e for e in pending if _matches(e["object"], selector))
        while True:
            with self.cond:
                while position >= len(self.events) and not self.closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self.cond.wait(left)
                if self.closing:
                    return
                fresh, position = self.events[position:], len(self.events)
            for _, event_kind, event, obj in fresh:
                ns = obj["metadata"].get("namespace", "")
                if event_kind != kind or (namespace is not None and ns != namespace):
                    continue
                if _matches(obj, selector):
                    yield {"type": event, "object": obj}


def _container(container: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """A container's status, with the fields the API always fills."""
    return {
        "name": container["name"],
        "image": container["image"],
        "imageID": "",
        "ready": "running" in state,
        "restartCount": 0,
        "started": "running" in state,
        "state": state,
    }


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _handler(cluster: FakeCluster) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self) -> tuple[str, str | None, str | None, dict[str, str]]:
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            parts = url.path.strip("/").split("/")
            cluster.requests.append((self.command, url.path))
            # /api/v1/nodes, /api/v1/pods, /api/v1/namespaces/NS/pods,
            # /apis/batch/v1/namespaces/NS/jobs[/NAME]
            parts = parts[2:] if parts[0] == "api" else parts[3:]
            namespace = None
            if parts and parts[0] == "namespaces" and len(parts) >= 3:
                namespace, parts = parts[1], parts[2:]
            kind = parts[0] if parts else ""
            name = parts[1] if len(parts) > 1 else None
            return kind, namespace, name, query

        def do_GET(self) -> None:
            kind, namespace, name, query = self._route()
            if kind not in KINDS:
                self._send(404, status(404, "NotFound", "the server could not find the resource"))
                return
            if name is not None:
                obj = cluster.get(kind, name, namespace or "")
                if obj is None:
                    self._send(
                        404, status(404, "NotFound", f'{kind} "{name}" not found', kind, name)
                    )
                else:
                    self._send(200, obj)
                return
            selector = query.get("labelSelector")
            if query.get("watch") in ("true", "1", "True"):
                self._watch(kind, namespace, selector, query)
                return
            items = [o for o in cluster.items(kind, namespace) if _matches(o, selector)]
            api_version, object_kind = KINDS[kind]
            self._send(
                200,
                {
                    "apiVersion": api_version,
                    "kind": f"{object_kind}List",
                    "metadata": {"resourceVersion": str(cluster.version)},
                    "items": items,
                },
            )

        def _watch(
            self, kind: str, namespace: str | None, selector: str | None, query: dict[str, str]
        ) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            timeout = min(float(query.get("timeoutSeconds", 30)), 30.0)
            try:
                for event in cluster.watch(
                    kind, namespace, selector, query.get("resourceVersion"), timeout
                ):
                    data = (json.dumps(event) + "\n").encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

        def do_POST(self) -> None:
            kind, namespace, _, _ = self._route()
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if kind != "jobs" or namespace is None:
                self._send(405, status(405, "MethodNotAllowed", "only jobs are created here"))
                return
            name = body.get("metadata", {}).get("name", "")
            if cluster.refuse_jobs:
                message = f'jobs.batch "{name}" is forbidden: {cluster.refuse_jobs}'
                self._send(403, status(403, "Forbidden", message, "jobs", name))
                return
            if cluster.get("jobs", name, namespace) is not None:
                message = f'jobs.batch "{name}" already exists'
                self._send(409, status(409, "AlreadyExists", message, "jobs", name))
                return
            self._send(201, cluster.create_job(namespace, body))

        def do_DELETE(self) -> None:
            kind, namespace, name, _ = self._route()
            length = int(self.headers.get("Content-Length", 0))
            if length:
                self.rfile.read(length)
            if kind != "jobs" or namespace is None or name is None:
                self._send(405, status(405, "MethodNotAllowed", "only jobs are deleted here"))
                return
            job = cluster.delete_job(namespace, name)
            if job is None:
                message = f'jobs.batch "{name}" not found'
                self._send(404, status(404, "NotFound", message, "jobs", name))
            else:
                self._send(200, status(200, "", "") | {"status": "Success"})

    return Handler
