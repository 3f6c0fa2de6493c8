"""Inference endpoints benchmark (issue 26): a service deployed on three CPU agents
labelled as three regions, driven from those regions, with one agent killed.

    python -m benchmarks.services                 # 20 s a phase
    python -m benchmarks.services --duration 10 --callers 2
    python -m benchmarks.services --quick         # a smoke run

It starts ``broker serve`` (SQLite in a temporary directory; as many web workers as
``broker serve`` starts here, so with several the relay runs in a process of its
own) with the relay delaying each request by the market's modelled round trip
between its caller and the replica (``BROKER_RELAY_SIMULATE_RTT``: loopback has no
distance), and three agents (``broker agent --adapter cpu``) placed in Amsterdam,
Ashburn and Singapore. A small model (a two-layer MLP, about a millisecond a call
here; its weights are constants of the program, so a request carries its batch
only) is deployed with users in the three places and a 40 ms SLO, so placement
must put a replica in each. Then two phases of closed-loop callers, the same
number in each region, each calling back to back with its region's location:

- **single**: one caller, in Amsterdam, alone: what routing adds on an idle machine.
- **single_via_web_worker**: the same through the broker's own port, where a web
  worker passes each request on to the relay process (with several workers).
- **steady**: every request, its latency as the caller saw it, the replica's own
  time (``X-Broker-Replica-Ms``) and the modelled round trip; what the broker's
  routing adds is the caller's latency less those two. A caller that called the
  replica directly would pay an HTTP request of its own too: ``plain_http_ms`` is
  such a request's round trip here (``GET /healthz``), to set beside it.
- **kill**: a quarter of the way in, the Ashburn agent is killed with SIGKILL; three
  seconds later it is started again (the machine comes back). Failed requests,
  latency meanwhile, and the time until three replicas answer again, against the
  node timeout.

Every process stops on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from solver.services import rtt_ms

REGIONS = {  # name: (country, lat, lon)
    "amsterdam": ("NL", 52.37, 4.90),
    "ashburn": ("US", 39.04, -77.49),
    "singapore": ("SG", 1.35, 103.82),
}
VICTIM = "ashburn"
SLO_MS = 40.0
NODE_TIMEOUT_S = 15.0
RESTART_S = 3.0  # after the kill, the machine's agent starts again


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mlp(w1: Any, w2: Any, x: Any) -> Any:
    import jax.numpy as jnp

    return jnp.tanh(jnp.tanh(x @ w1) @ w2)


class Market:
    """``broker serve`` and the agents, as processes of this one."""

    def __init__(self, workdir: Path, workers: int | None) -> None:
        self.workdir, self.port = workdir, _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "BROKER_DATA_DIR": str(workdir / "broker"),
            "BROKER_DATABASE_URL": "",
            "BROKER_CLEAR_INTERVAL_SECONDS": "0.5",
            "BROKER_CLEAR_TIME_LIMIT_SECONDS": "2",
            "BROKER_NODE_TIMEOUT_S": str(NODE_TIMEOUT_S),
            "BROKER_SERVICE_WINDOW_S": "1",
            "BROKER_SERVICE_START_GRACE_S": "10",
            "BROKER_RELAY_SIMULATE_RTT": "1",
            "BROKER_RELAY_PORT": str(_port()),
            "BROKER_RATE_LIMIT_PER_SECOND": "100000",
            "BROKER_RATE_LIMIT_BURST": "100000",
            "JAX_PLATFORMS": "cpu",
        }
        self.workers = workers
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def _start(self, name: str, *args: str) -> None:
        with (self.workdir / f"{name}.log").open("ab") as log:  # the child keeps its own
            self.processes[name] = subprocess.Popen(  # noqa: S603 - our own command
                [sys.executable, "-m", "broker.cli", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,
            )

    def _cli(self, *args: str) -> str:
        done = subprocess.run(  # noqa: S603 - our own command
            [sys.executable, "-m", "broker.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return done.stdout

    def start(self) -> str:
        """Start the broker and the agents; returns a developer's key."""
        serve = ["serve", "--port", str(self.port), "--no-access-log"]
        if self.workers:
            serve += ["--workers", str(self.workers)]
        self._cli("db", "upgrade")
        self._start("broker", *serve, "--no-migrate")
        _wait(lambda: _ready(self.url), 60, "the broker to serve")
        keys = {
            role: self._cli("accounts", "create", role, "--role", role).strip().splitlines()[-1]
            for role in ("developer", "provider")
        }
        self.key_file = self.workdir / "provider.key"
        self.key_file.touch(mode=0o600)
        self.key_file.write_text(keys["provider"])
        for name in REGIONS:
            self.start_agent(name)
        return keys["developer"]

    def start_agent(self, name: str) -> None:
        country, lat, lon = REGIONS[name]
        self._start(
            f"agent-{name}",
            "agent",
            "--broker", self.url,
            "--api-key-file", str(self.key_file),
            "--adapter", "cpu",
            "--price", "cpu=0.10",
            "--name", name,
            "--region", name,
            "--country", country,
            "--lat", str(lat),
            "--lon", str(lon),
        )  # fmt: skip

    def kill(self, name: str) -> None:
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


@dataclass
class Call:
    at: float  # seconds since the phase started
    region: str
    status: int
    total_ms: float
    replica_ms: float
    replica: str | None
    retries: int


@dataclass
class Load:
    """Closed-loop callers, ``callers`` per region, until stopped."""

    url: str
    key: str
    service_id: str
    body: bytes
    callers: int
    calls: list[Call] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(
        self,
        seconds: float,
        during: Callable[[float], None] | None = None,
        regions: tuple[str, ...] = tuple(REGIONS),
    ) -> None:
        self.began = time.perf_counter()
        threads = [
            threading.Thread(target=self._caller, args=(region,), daemon=True)
            for region in regions
            for _ in range(self.callers)
        ]
        for thread in threads:
            thread.start()
        while (elapsed := time.perf_counter() - self.began) < seconds:
            if during is not None:
                during(elapsed)
            time.sleep(0.05)
        self.stop.set()
        for thread in threads:
            thread.join(timeout=60)

    def _caller(self, region: str) -> None:
        _, lat, lon = REGIONS[region]
        headers = {
            "Authorization": f"Bearer {self.key}",
            "Content-Type": "application/octet-stream",
            "X-Broker-Location": f"{lat},{lon}",
        }
        path = f"/v1/services/{self.service_id}/infer"
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                began = time.perf_counter()
                try:
                    response = client.post(path, content=self.body, headers=headers)
                    status = response.status_code
                except httpx.HTTPError:
                    status, response = 0, None
                total = (time.perf_counter() - began) * 1000
                h = response.headers if response is not None else {}
                self.calls.append(
                    Call(
                        began - self.began,
                        region,
                        status,
                        total,
                        float(h.get("X-Broker-Replica-Ms", 0.0)),
                        h.get("X-Broker-Replica"),
                        int(h.get("X-Broker-Retries", 0)),
                    )
                )


def _plain_requests(url: str, count: int) -> dict[str, float | None]:
    """The round trip of a request that does nothing (``GET /healthz``) from one caller:
    what calling a replica directly would cost besides its own time."""
    with httpx.Client(base_url=url, timeout=10) as client:
        times = []
        for _ in range(count):
            began = time.perf_counter()
            client.get("/healthz")
            times.append((time.perf_counter() - began) * 1000)
    return _percentiles(times[count // 10 :])


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}


def figures(
    calls: list[Call], seconds: float, where: dict[str, tuple[float, float]]
) -> dict[str, Any]:
    """Throughput, latency, what routing added and the share within the SLO."""
    ok = [c for c in calls if c.status == 200]
    added, within = [], 0
    for c in ok:
        _, lat, lon = REGIONS[c.region]
        rtt = rtt_ms(lat, lon, *where[c.replica]) if c.replica in where else 0.0
        added.append(c.total_ms - c.replica_ms - rtt)
        within += c.total_ms - c.replica_ms <= SLO_MS
    return {
        "requests": len(calls),
        "per_second": round(len(ok) / seconds, 1),
        "errors": len(calls) - len(ok),
        "error_statuses": dict(Counter(c.status for c in calls if c.status != 200)),
        "retried": sum(c.retries > 0 for c in ok),
        "latency_ms": _percentiles([c.total_ms for c in ok]),
        "in_replica_ms": _percentiles([c.replica_ms for c in ok]),
        "routing_added_ms": _percentiles(added),
        "within_slo": round(within / len(ok), 4) if ok else None,
        "per_region": {r: _percentiles([c.total_ms for c in ok if c.region == r]) for r in REGIONS},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds a phase")
    parser.add_argument("--callers", type=int, default=2, help="callers per region")
    parser.add_argument("--workers", type=int, default=0, help="web workers (0: serve's)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 8 s phases")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    seconds = 8.0 if args.quick else max(args.duration, 8.0)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from broker.portable import arrays
    from broker.sdk import Client

    workdir = Path(tempfile.mkdtemp(prefix="broker-services-"))
    market = Market(workdir, args.workers or None)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        key = market.start()
        client = Client(market.url, key)
        _wait(lambda: client.http.json("GET", "/v1/offers")["total"] == 3, 120, "3 offers")
        rng = np.random.default_rng(0)
        w1 = (rng.normal(size=(256, 256)) / 16).astype(np.float32)
        w2 = (rng.normal(size=(256, 64)) / 16).astype(np.float32)
        x = rng.normal(size=(16, 256)).astype(np.float32)
        users = [{"name": n, "lat": lat, "lon": lon} for n, (_, lat, lon) in REGIONS.items()]
        # The weights are the program's own (constants in it), as a served model's are:
        # a request carries only its batch.
        service = client.deploy(
            functools.partial(mlp, w1, w2),
            x,
            users=users,
            latency_slo_ms=SLO_MS,
            max_price_per_hour=1.0,
            min_replicas=3,
            max_replicas=3,
            platforms=("cpu",),
            name="mlp",
        )
        service.wait_ready(replicas=3, timeout=180)
        where = {r["allocation_id"]: (r["lat"], r["lon"]) for r in service.refresh().replicas}
        body = arrays.encode([x])
        # Callers send requests where the SDK does: the relay process, when there is one.
        target = service.data.get("relay") or market.url
        baseline = _plain_requests(target, 400)
        single = Load(target, key, service.id, body, 1)
        single.run(seconds, regions=("amsterdam",))
        if target != market.url:  # what a caller of the broker's own URL sees (curl)
            through = Load(market.url, key, service.id, body, 1)
            through.run(seconds, regions=("amsterdam",))
        steady = Load(target, key, service.id, body, args.callers)
        steady.run(seconds)
        report: dict[str, Any] = {
            "workers": args.workers or "serve's default",
            "callers_send_to": "the relay process" if target != market.url else "the broker",
            "callers": args.callers * len(REGIONS),
            "seconds": seconds,
            "plain_http_ms": baseline,
            "single": figures(single.calls, seconds, where),
            "single_via_web_worker": figures(through.calls, seconds, where)
            if target != market.url
            else None,
            "steady": figures(steady.calls, seconds, where),
        }

        killed: dict[str, float] = {}

        def chaos(elapsed: float) -> None:
            if "at" not in killed and elapsed >= seconds / 4:
                market.kill(f"agent-{VICTIM}")
                killed["at"] = elapsed
            elif "back" not in killed and "at" in killed and elapsed >= killed["at"] + RESTART_S:
                market.start_agent(VICTIM)
                killed["back"] = elapsed

        kill = Load(target, key, service.id, body, args.callers)
        kill.run(seconds, chaos)
        up = _wait(
            lambda: (
                sum(r["healthy"] for r in service.refresh().replicas) >= 3 and time.perf_counter()
            ),
            120,
            "three replicas again",
        )
        where.update({r["allocation_id"]: (r["lat"], r["lon"]) for r in service.replicas})
        after = [c for c in kill.calls if c.at >= killed["at"]]
        report["kill"] = {
            **figures(kill.calls, seconds, where),
            "killed_at_s": round(killed["at"], 2),
            "agent_back_at_s": round(killed.get("back", float("nan")), 2),
            "three_replicas_again_after_s": round(up - kill.began - killed["at"], 2),
            "node_timeout_s": NODE_TIMEOUT_S,
            "after_kill": figures(after, max(1e-3, seconds - killed["at"]), where),
        }
        service.undeploy()
        client.close()
    finally:
        market.stop()
        signal.signal(signal.SIGTERM, previous)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
