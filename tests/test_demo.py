"""`broker serve --demo` (what `make run` starts): within a couple of minutes the market
has every demo provider's offers, emulated ones labelled, and jobs that ran and were
invoiced."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
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


def _session_processes(sid: int) -> list[str]:
    """Live (not zombie) processes of session ``sid``: everything `broker serve` started."""
    done = subprocess.run(
        ["ps", "-o", "pid=,stat=,args=", "-s", str(sid)],
        capture_output=True,
        text=True,
        check=False,
    )
    return [line for line in done.stdout.splitlines() if line.split()[1][0] != "Z"]


def test_serve_demo_shows_a_working_market_and_stops_cleanly(tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "BROKER_DATA_DIR": str(tmp_path),
        "BROKER_DATABASE_URL": "",
        "BROKER_CLEAR_INTERVAL_SECONDS": "2",
    }
    env.pop("BROKER_LOG_FORMAT", None)
    env.pop("BROKER_ALLOW_CAPACITY_BIDS", None)  # the demo's bids all carry programs
    log_path = tmp_path / "serve.log"
    log_file = log_path.open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "serve", "--demo", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=log_file,
        text=True,
        start_new_session=True,  # as a terminal's foreground job: the session is all of it
    )
    try:
        keys: dict[str, str] = {}
        printed = 0
        assert server.stdout is not None
        deadline = time.monotonic() + 180
        for line in server.stdout:
            parts = line.split()
            if len(parts) == 2 and parts[0].startswith("demo-") and parts[1].startswith("bk_"):
                keys[parts[0]] = parts[1]
                printed += parts[0] == "demo-eu-lab"
            # The keys again, once every agent has listed its offers.
            if printed == 2 or time.monotonic() > deadline:
                break
        assert printed == 2
        assert set(keys) >= {"demo-admin", "demo-ml-team", "demo-cpu"}
        saved = tmp_path / "demo-keys.txt"
        assert saved.stat().st_mode & 0o777 == 0o600
        assert f"demo-ml-team {keys['demo-ml-team']}" in saved.read_text()
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=10) as client:
            while True:
                offers = _get(client, "/v1/offers?limit=50", keys["demo-admin"])["items"]
                done = _get(client, "/v1/jobs?state=succeeded", keys["demo-admin"])["total"]
                invoiced = _get(client, "/v1/invoices?limit=100", keys["demo-admin"])["items"]
                # The demo's jobs run long enough, at high enough prices, to bill cents.
                billed = max((Decimal(i["total"]) for i in invoiced), default=Decimal(0))
                if len(offers) == len(PROVIDERS) + 1 and done >= 3 and billed > 0:
                    break
                assert time.monotonic() < deadline, (len(offers), done, billed)
                time.sleep(2)
            emulated = {o["accelerator"] for o in offers if o["emulated"]}
            assert emulated == {p.model for p in PROVIDERS}
            assert [o["accelerator"] for o in offers if not o["emulated"]] == ["cpu"]
            # The dashboard answers at the root: its sign-in page, then the market.
            home = client.get("/", follow_redirects=True)
            assert home.status_code == 200
            assert "text/html" in home.headers["content-type"]
            nodes = _get(client, "/v1/nodes?limit=50", keys["demo-admin"])["items"]
            assert len(nodes) == len(PROVIDERS) + 1
        assert len(_session_processes(server.pid)) > len(PROVIDERS) + 3
    finally:
        # Ctrl-C: the terminal signals the foreground job's process group.
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        assert server.stdout is not None
        server.stdout.close()
        log_file.close()
    logs = log_path.read_text()
    assert server.returncode == 0, logs[-3000:]
    assert "Traceback" not in logs, logs[-3000:]
    assert not logs.lstrip().startswith("{"), "the demo logs as text"
    assert "GET /v1/allocations" not in logs  # agents' polling is quiet
    # Nothing it started is left running, and every agent signed off first.
    assert _session_processes(server.pid) == []
    assert logs.count("signed off") == len(PROVIDERS) + 1, logs[-3000:]
