"""The whole marketplace as real processes on 127.0.0.1: a broker server and two CPU
agents. A developer's iterative job runs; the agent running it is killed with
SIGKILL after a checkpoint; the job resumes on the other agent from that
checkpoint and ends with the same result as an uninterrupted run, its usage
counted once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.db import make_engine
from broker.models.market import Allocation
from broker.models.node import Node
from broker.models.offer import Offer
from broker.sdk import Client

STEPS, EVERY = 400, 25


def step(state: tuple[Any, Any], m: Any) -> tuple[Any, Any]:
    """A few milliseconds of matmuls per step, so a run lasts long enough to kill."""
    w, count = state

    def body(_: Any, w: Any) -> Any:
        return jnp.tanh(w @ m) * 0.9 + w * 0.1

    return jax.lax.fori_loop(0, 6, body, w), count + 1


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Processes:
    """Start processes with the broker's environment; kill them all at the end."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str, data_dir: Path | None = None) -> None:
        env = dict(self.env)
        if data_dir is not None:
            env["BROKER_DATA_DIR"] = str(data_dir)
        with (self.logs / f"{name}.log").open("wb") as log:
            self.started[name] = subprocess.Popen(
                [sys.executable, "-m", "broker.cli", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

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

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.started.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture
def market(empty_database_url: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    port = _port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "BROKER_DATA_DIR": str(tmp_path / "broker"),
        "BROKER_DATABASE_URL": empty_database_url,
        "BROKER_NODE_TIMEOUT_S": "6",
        "BROKER_MAX_ATTEMPTS": "5",
        "BROKER_CLEAR_INTERVAL_SECONDS": "0.5",
        "BROKER_CLEAR_TIME_LIMIT_SECONDS": "2",
        "JAX_PLATFORMS": "cpu",
    }
    procs = Processes(env, tmp_path)
    try:
        procs.start("broker", "serve", "--port", str(port))
        _wait_for(lambda: _ready(url), 60, "the broker to serve")
        keys = {
            role: procs.cli("accounts", "create", role, "--role", role).strip().splitlines()[-1]
            for role in ("developer", "provider")
        }
        key_file = tmp_path / "provider.key"  # never on the command line: ps shows it
        key_file.touch(mode=0o600)
        key_file.write_text(keys["provider"])
        for name, price in (("agent-a", "0.10"), ("agent-b", "0.20")):
            procs.start(
                name,
                "agent",
                "--broker", url,
                "--api-key-file", str(key_file),
                "--adapter", "cpu",
                "--price", f"cpu={price}",
                "--name", name,
                "--region", "europe-west4",
                "--country", "NL",
                "--lat", "53.44",
                "--lon", "6.84",
                data_dir=tmp_path / name,
            )  # fmt: skip
        client = Client(url, keys["developer"])
        _wait_for(lambda: len(_offers(client)) == 2, 90, "both agents to publish offers")
        yield {"url": url, "client": client, "procs": procs, "db": empty_database_url}
        client.close()
    finally:
        procs.stop_all()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _offers(client: Client) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = client.http.json("GET", "/v1/offers")["items"]
    return items


def test_a_job_survives_its_agent_being_killed(market: dict[str, Any]) -> None:
    client: Client = market["client"]
    procs: Processes = market["procs"]
    price: dict[str, Any] = {"max_price_per_hour": "1.00", "accelerators": 1}

    # A plain job runs on the cheaper agent and returns the right answer.
    x = jnp.arange(6.0, dtype=jnp.float32)
    simple = client.submit(lambda v: (v * 2, v.sum()), x, **price)
    simple.wait(timeout=120, progress=False)
    doubled, total = simple.result()
    np.testing.assert_array_equal(doubled, np.arange(6.0) * 2)
    assert float(total) == 15.0

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(192, 192)) * 0.1, jnp.float32)
    m = jnp.asarray(rng.normal(size=(192, 192)) * 0.1, jnp.float32)
    state = (w, jnp.int32(0))
    job = client.submit(step, state, m, steps=STEPS, checkpoint_every=EVERY, **price)

    # Kill the agent running it once it has saved a checkpoint.
    def checkpointed() -> dict[str, Any] | None:
        data: dict[str, Any] = job.refresh().data
        return data if data["state"] == "running" and data["checkpoint_step"] >= EVERY else None

    seen = _wait_for(checkpointed, 120, "the job's first checkpoint")
    assert seen["steps_done"] < STEPS, "the job ran too fast to be interrupted"
    first = _holder(market["db"], job.id)
    procs.started[first].send_signal(signal.SIGKILL)
    procs.started[first].wait(timeout=10)

    job.wait(timeout=180, progress=False)
    out = job.result()
    plain = state
    for _ in range(STEPS):
        plain = jax.jit(step)(plain, m)
    np.testing.assert_allclose(out[0], plain[0], rtol=1e-5, atol=1e-5)
    assert int(out[1]) == STEPS

    other = "agent-b" if first == "agent-a" else "agent-a"
    resumed = [
        int(line.rsplit(" ", 1)[1])
        for line in procs.log(other).splitlines()
        if f"resumes job {job.id} from its checkpoint at step" in line
    ]
    assert resumed, procs.log(other)[-3000:]
    assert resumed[-1] >= seen["checkpoint_step"]
    assert job.data["attempts"] >= 2

    # Usage: each allocation within its own wall time, the job's total their sum.
    engine = make_engine(market["db"])
    try:
        with Session(engine) as session:
            rows = session.execute(
                select(Allocation, Node.name)
                .join(Offer, Offer.id == Allocation.offer_id)
                .join(Node, Node.id == Offer.node_id)
                .where(Allocation.job_id == job.id)
                .order_by(Allocation.created_at)
            ).all()
    finally:
        engine.dispose()
    lost = [a for a, name in rows if name == first and a.end_reason]
    assert lost
    assert "no heartbeat" in (lost[0].end_reason or "")
    assert rows[-1][1] == other
    assert rows[-1][0].status == "finished"
    for allocation, _ in rows:
        if allocation.started_at is not None and allocation.ended_at is not None:
            wall = (allocation.ended_at - allocation.started_at).total_seconds()
            assert allocation.usage_ms <= wall * 1000 * allocation.accelerators
    total_ms = sum(a.usage_ms for a, _ in rows)
    assert total_ms > 0
    assert job.data["accelerator_seconds"] == pytest.approx(total_ms / 1000)
    started = min(a.started_at for a, _ in rows if a.started_at)
    ended = max(a.ended_at for a, _ in rows if a.ended_at)
    assert total_ms / 1000 <= (ended - started).total_seconds()


def _holder(database_url: str, job_id: str) -> str:
    """The name of the node whose agent runs the job now."""
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            name = session.scalar(
                select(Node.name)
                .join(Offer, Offer.node_id == Node.id)
                .join(Allocation, Allocation.offer_id == Offer.id)
                .where(Allocation.job_id == job_id, Allocation.status == "active")
            )
    finally:
        engine.dispose()
    assert name is not None
    return name
