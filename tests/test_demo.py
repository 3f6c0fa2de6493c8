"""`broker serve --demo` (what `make run` starts): within a couple of minutes the market
has every demo provider's offers, emulated ones labelled, and jobs that ran and were
invoiced."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from broker.demo import PROVIDERS, listings
from tests.test_live_server import _free_port


def test_the_demo_prices_come_from_the_reference_data() -> None:
    by_model = {item.capacity.model: item for item in listings()}
    assert by_model["h100-sxm"].price == 55.04 / 8 or str(by_model["h100-sxm"].price) == "6.880000"
    assert str(by_model["tpu-v5e"].price) == "1.200000"  # gcp us-east1, per chip
    assert by_model["mi300x"].country == "ZA"
    assert "skypilot-catalog" in by_model["a100-80gb"].source
    assert by_model["jetson-agx-orin"].source.startswith("demo price")


def _get(client: httpx.Client, path: str, key: str) -> Any:
    answer = client.get(path, headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_serve_demo_shows_a_working_market(tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "BROKER_DATA_DIR": str(tmp_path),
        "BROKER_DATABASE_URL": "",
        "BROKER_CLEAR_INTERVAL_SECONDS": "2",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "serve", "--demo", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        keys: dict[str, str] = {}
        assert server.stdout is not None
        deadline = time.monotonic() + 180
        for line in server.stdout:
            parts = line.split()
            if len(parts) == 2 and parts[0].startswith("demo-") and parts[1].startswith("bk_"):
                keys[parts[0]] = parts[1]
            if "demo-eu-lab" in keys or time.monotonic() > deadline:
                break
        assert set(keys) >= {"demo-admin", "demo-ml-team", "demo-cpu"}
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=10) as client:
            while True:
                offers = _get(client, "/v1/offers?limit=50", keys["demo-admin"])["items"]
                done = _get(client, "/v1/jobs?state=succeeded", keys["demo-admin"])["total"]
                invoices = _get(client, "/v1/invoices", keys["demo-admin"])["total"]
                if len(offers) == len(PROVIDERS) + 1 and done >= 3 and invoices >= 1:
                    break
                assert time.monotonic() < deadline, (len(offers), done, invoices)
                time.sleep(2)
            emulated = {o["accelerator"] for o in offers if o["emulated"]}
            assert emulated == {p.model for p in PROVIDERS}
            assert [o["accelerator"] for o in offers if not o["emulated"]] == ["cpu"]
            # The dashboard answers at the root: its sign-in page, then the market.
            home = client.get("/", follow_redirects=True)
            assert home.status_code == 200
            assert "text/html" in home.headers["content-type"]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stdout:
            server.stdout.close()
