"""The real thing: `broker serve` in its own process, driven over HTTP.

Covers what in-process tests cannot: the CLI entry point, restarts (nothing is
lost), concurrent retries racing on one Idempotency-Key, and the README's
quickstart run exactly as written.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, url: str, tmp_path: Path, clear_interval: float = 0) -> None:
        self.env = {
            **os.environ,
            "BROKER_DATABASE_URL": url,
            "BROKER_DATA_DIR": str(tmp_path),
            "BROKER_CLEAR_INTERVAL_SECONDS": str(clear_interval),
        }
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "broker.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "serve", "--port", str(self.port)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Generous: a shared CI machine under load can take long to import and migrate.
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=self.base, timeout=1) as client:
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    if client.get("/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    time.sleep(0.1)
        self.process.kill()
        self.process.wait()
        raise RuntimeError("broker serve did not come up in 120 s (or exited)")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def server(empty_database_url: str, tmp_path: Path) -> Iterator[Server]:
    srv = Server(empty_database_url, tmp_path)
    srv.start()
    yield srv
    srv.stop()


def test_restart_loses_nothing(server: Server) -> None:
    provider_key = server.cli("accounts", "create", "farm", "--role", "provider").splitlines()[-1]
    dev_key = server.cli("accounts", "create", "dev", "--role", "developer").splitlines()[-1]
    provider = httpx.Client(
        base_url=server.base, headers={"Authorization": f"Bearer {provider_key}"}
    )
    dev = httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {dev_key}"})
    with provider, dev:
        _restart_and_compare(server, provider, dev)


def _restart_and_compare(server: Server, provider: httpx.Client, dev: httpx.Client) -> None:
    offer = provider.post(
        "/v1/offers",
        json={
            "accelerator": "tpu-v5e",
            "count": 8,
            "price_per_hour": "1.20",
            "region": "us-central1",
            "country": "US",
            "lat": 41.26,
            "lon": -95.86,
        },
    ).json()
    job = dev.post(
        "/v1/jobs",
        json={
            "platforms": ["tpu"],
            "max_price_per_hour": "1.50",
            "duration_hours": 1,
        },
    ).json()
    cancelled = dev.post(
        "/v1/jobs",
        json={
            "platforms": ["tpu"],
            "max_price_per_hour": "1.40",
            "duration_hours": 1,
        },
    ).json()
    dev.post(f"/v1/jobs/{cancelled['id']}/cancel")

    server.stop()
    server.start()

    assert provider.get(f"/v1/offers/{offer['id']}").json() == offer
    detail = dev.get(f"/v1/jobs/{job['id']}").json()
    assert {k: v for k, v in detail.items() if k not in ("allocation", "unmatched")} == job
    assert dev.get(f"/v1/jobs/{cancelled['id']}").json()["state"] == "cancelled"
    book = dev.get("/v1/market/book").json()["books"]
    assert [(b["accelerator"], b["best_ask"], b["best_bid"]) for b in book] == [
        ("tpu-v5e", "1.20", "1.50")
    ]


def test_concurrent_retries_create_one_job(server: Server) -> None:
    key = server.cli("accounts", "create", "racer", "--role", "developer").splitlines()[-1]
    body = {"platforms": ["cuda"], "max_price_per_hour": "2.00", "duration_hours": 3}

    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "same-every-time"}

    def submit(_: int) -> tuple[int, str]:
        # One client per request: separate connections, so the retries really race.
        with httpx.Client(base_url=server.base, timeout=30) as client:
            response = client.post("/v1/jobs", json=body, headers=headers)
        assert response.status_code in (200, 201), response.text
        return response.status_code, response.json()["id"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(submit, range(16)))
    assert {job_id for _, job_id in results} == {results[0][1]}
    assert sorted(status for status, _ in results) == [200] * 15 + [201]
    with httpx.Client(base_url=server.base, headers=headers) as client:
        assert client.get("/v1/jobs").json()["total"] == 1


def test_readme_quickstart_works_as_written(empty_database_url: str, tmp_path: Path) -> None:
    server = Server(empty_database_url, tmp_path)
    # A broker as `make run` starts it: bids must carry their program.
    server.env["BROKER_ALLOW_CAPACITY_BIDS"] = "0"
    server.start()
    try:
        _run_the_quickstart(server)
    finally:
        server.stop()


def _run_the_quickstart(server: Server) -> None:
    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!-- quickstart -->\s*```bash\n(.*?)```", readme, re.S)
    assert match, "README.md has no quickstart block"
    broker_bin = REPO / ".venv" / "bin" / "broker"
    assert broker_bin.exists(), "the quickstart uses .venv/bin/broker: run `make test`"
    script = match.group(1).replace("http://127.0.0.1:8000", server.base)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=REPO,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert '"accelerator":"h100-sxm"' in out  # the offer, filled from the catalog
    assert '"vendor":"nvidia"' in out
    assert "submitted job_" in out
    assert '"best_ask":"2.49"' in out  # the book
    assert '"best_bid":"3.10"' in out
    assert '"matched":1' in out  # the round
    job = json.loads(out.strip().splitlines()[-1])
    assert job["state"] == "matched"
    assert job["allocation"]["price_per_hour"] == "2.49"
    assert job["allocation"]["accelerators"] == 2
    assert job["artifact"] is not None  # the program the CLI packaged


def test_the_server_clears_the_market_by_itself(empty_database_url: str, tmp_path: Path) -> None:
    srv = Server(empty_database_url, tmp_path, clear_interval=0.5)
    srv.start()
    try:
        provider_key = srv.cli("accounts", "create", "p", "--role", "provider").splitlines()[-1]
        dev_key = srv.cli("accounts", "create", "d", "--role", "developer").splitlines()[-1]
        with httpx.Client(base_url=srv.base) as client:
            offer = {
                "accelerator": "l4",
                "count": 1,
                "price_per_hour": "0.70",
                "region": "us-central1",
                "country": "US",
                "lat": 41.26,
                "lon": -95.86,
            }
            client.post(
                "/v1/offers", json=offer, headers={"Authorization": f"Bearer {provider_key}"}
            )
            auth = {"Authorization": f"Bearer {dev_key}"}
            job = client.post(
                "/v1/jobs",
                json={"platforms": ["cuda"], "max_price_per_hour": "1.00", "duration_hours": 1},
                headers=auth,
            ).json()
            deadline = time.monotonic() + 30
            state = "open"
            while state == "open" and time.monotonic() < deadline:
                time.sleep(0.3)
                state = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["state"]
            assert state == "matched"
            rounds = client.get("/v1/market/rounds", headers=auth).json()
            assert rounds["items"][0]["trigger"] == "auto"
    finally:
        srv.stop()
