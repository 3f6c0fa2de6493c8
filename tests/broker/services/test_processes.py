"""Issue 26 end to end as real processes: ``broker serve`` (two web workers and its
relay process) and two CPU agents. A service is deployed; it answers with the right
results; under load it scales up to a second replica; the agent of one replica is
killed with SIGKILL mid-load and no request fails; calm again, it scales down; it is
undeployed and each replica's run is billed on its own invoice line."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from broker.sdk import Client
from broker.sdk.http import BrokerError
from tests.broker.agent.test_processes import Processes, _port, _ready, _wait_for

W = np.linspace(-1, 1, 256 * 256, dtype=np.float32).reshape(256, 256) / 16


def model(w: Any, x: Any) -> Any:
    """Some milliseconds of matmuls a request, so that requests queue under load."""
    return jax.lax.fori_loop(0, 40, lambda _, h: jnp.tanh(h @ w), x)


def expected(x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(model)(W, x))


@pytest.fixture
def market(empty_database_url: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    import os

    port = _port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "BROKER_DATA_DIR": str(tmp_path / "broker"),
        "BROKER_DATABASE_URL": empty_database_url,
        "BROKER_NODE_TIMEOUT_S": "6",
        "BROKER_CLEAR_INTERVAL_SECONDS": "0.5",
        "BROKER_CLEAR_TIME_LIMIT_SECONDS": "2",
        "BROKER_SERVICE_WINDOW_S": "1",
        "BROKER_SERVICE_SCALE_UP_S": "3",
        "BROKER_SERVICE_SCALE_DOWN_S": "6",
        "BROKER_RELAY_PORT": str(_port()),
        "JAX_PLATFORMS": "cpu",
    }
    procs = Processes(env, tmp_path)
    try:
        procs.start("broker", "serve", "--port", str(port), "--workers", "2")
        _wait_for(lambda: _ready(url), 60, "the broker to serve")
        keys = {
            role: procs.cli("accounts", "create", role, "--role", role).strip().splitlines()[-1]
            for role in ("developer", "provider")
        }
        key_file = tmp_path / "provider.key"
        key_file.touch(mode=0o600)
        key_file.write_text(keys["provider"])
        places = {"agent-ams": ("NL", "52.37", "4.90"), "agent-fra": ("DE", "50.11", "8.68")}
        for name, (country, lat, lon) in places.items():
            procs.start(
                name,
                "agent",
                "--broker", url,
                "--api-key-file", str(key_file),
                "--adapter", "cpu",
                "--price", "cpu=0.10",
                "--name", name,
                "--region", name.removeprefix("agent-"),
                "--country", country,
                "--lat", lat,
                "--lon", lon,
                data_dir=tmp_path / name,
            )  # fmt: skip
        client = Client(url, keys["developer"], retries=0)
        _wait_for(
            lambda: client.http.json("GET", "/v1/offers")["total"] == 2, 90, "both agents' offers"
        )
        yield {"url": url, "client": client, "procs": procs}
        client.close()
    finally:
        procs.stop_all()


class Load:
    """Callers in threads, each calling the service back to back, checking answers."""

    def __init__(self, service: Any, callers: int) -> None:
        self.service, self.stop = service, threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.replicas: set[str] = set()
        self.threads = [threading.Thread(target=self._call, daemon=True) for _ in range(callers)]
        for thread in self.threads:
            thread.start()

    def _call(self) -> None:
        rng = np.random.default_rng(threading.get_ident() % 1000)
        while not self.stop.is_set():
            x = rng.normal(size=(8, 256)).astype(np.float32)
            try:
                got = self.service.infer(W, x)
                np.testing.assert_allclose(np.asarray(got), expected(x), rtol=1e-4, atol=1e-5)
                self.ok += 1
                if self.service.last_replica:
                    self.replicas.add(self.service.last_replica)
            except (BrokerError, AssertionError) as e:
                self.failures.append(str(e)[:300])

    def end(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def _events(service: Any) -> list[str]:
    return [e["kind"] for e in service.refresh().data["events"]]


def test_a_service_scales_survives_a_killed_agent_and_bills(market: dict[str, Any]) -> None:
    client: Client = market["client"]
    procs: Processes = market["procs"]
    x = np.ones((8, 256), dtype=np.float32)
    service = client.deploy(
        model,
        W,
        x,
        name="tanh",
        users=[{"name": "amsterdam", "lat": 52.37, "lon": 4.9}],
        latency_slo_ms=20,
        max_price_per_hour=1.0,
        min_replicas=1,
        max_replicas=2,
        target_queue=0.5,
    )
    service.wait_ready(timeout=120)
    np.testing.assert_allclose(np.asarray(service.infer(W, x)), expected(x), rtol=1e-4, atol=1e-5)

    # Under load it scales up: a second replica, which the relay also sends requests to.
    load = Load(service, callers=6)
    _wait_for(lambda: "scale_up" in _events(service), 60, "a scale-up")
    service.wait_ready(replicas=2, timeout=120)
    _wait_for(lambda: len(load.replicas) == 2, 60, "requests on both replicas")

    # One replica's agent dies mid-load: the relay sends its requests to the other.
    victim = service.refresh().replicas[0]
    name = "agent-ams" if victim["region"] == "ams" else "agent-fra"
    before = load.ok
    procs.started[name].send_signal(signal.SIGKILL)
    procs.started[name].wait(timeout=10)
    time.sleep(3)
    load.end()
    assert load.ok > before
    assert not load.failures, load.failures[:5]

    # Calm: it scales back down to one replica.
    _wait_for(lambda: "scale_down" in _events(service), 60, "a scale-down")
    detail = service.refresh().data
    assert detail["desired_replicas"] == 1
    reasons = {e["kind"]: e["reason"] for e in detail["events"]}
    assert "requests waiting per replica" in reasons["scale_up"]
    assert detail["regions"][0]["requests"] >= 0

    service.undeploy()
    assert service.state == "undeployed"
    _wait_for(
        lambda: not any(r["state"] == "running" for r in service.refresh().replicas),
        30,
        "replicas to stop",
    )
    invoices = client.generate_invoice()
    lines = [line for i in invoices for line in client.invoice(i["id"])["lines"]]
    replica_lines = [line for line in lines if line["description"].startswith("tanh replica ")]
    assert len({line["job_id"] for line in replica_lines}) >= 2, lines
