"""A database outage longer than the node timeout does not evict the fleet: PostgreSQL
stopped and started again under a live broker and a running agent."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import pytest
from sqlalchemy import select

from adapters import registry
from broker.agent import AgentConfig, NodeAgent, parse_prices
from broker.db import make_engine, transaction
from broker.migrate import upgrade
from broker.models.account import Role
from broker.models.node import Node
from broker.sdk import Client
from tests.factories import make_account
from tests.test_live_server import Server, _free_port


def _pg_bin() -> Path | None:
    for found in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (found / "initdb").exists():
            return found
    return None


class Postgres:
    """A PostgreSQL cluster of this test's own, to stop and start at will."""

    def __init__(self) -> None:
        bin_dir = _pg_bin()
        if bin_dir is None:
            pytest.skip("PostgreSQL is not installed")
        self.bin = bin_dir
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            if (
                shutil.which("runuser") is None
                or subprocess.run(["id", "postgres"], capture_output=True, check=False).returncode
            ):
                pytest.skip("running as root needs a postgres user to run PostgreSQL")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.dir = Path(tempfile.mkdtemp(prefix="broker-outage-pg-"))
        self.dir.chmod(0o755)
        if self.as_user:
            shutil.chown(self.dir, "postgres")
        self.port = _free_port()
        self._pg("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "-A", "trust")
        self.start()
        self._pg("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "broker")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/broker"

    def _pg(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin / tool), *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off"
        log = str(self.dir / "server.log")
        self._pg("pg_ctl", "-D", str(self.dir / "data"), "-l", log, "-w", "-o", options, "start")

    def stop(self) -> None:
        self._pg("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        subprocess.run(
            [
                *self.as_user,
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.dir / "data"),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    server = Postgres()
    yield server
    server.remove()


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def step(state: tuple[Any, Any], m: Any) -> tuple[Any, Any]:
    w, count = state
    return jax.lax.fori_loop(0, 8, lambda _, w: jnp.tanh(w @ m), w), count + 1


def test_a_database_outage_longer_than_the_node_timeout_evicts_no_one(
    postgres: Postgres, tmp_path: Path
) -> None:
    timeout = 4.0
    upgrade("head", url=postgres.url)
    engine = make_engine(postgres.url)
    with transaction(engine) as session:
        _, dev_key = make_account(session, Role.developer)
        _, prov_key = make_account(session, Role.provider)
    engine.dispose()
    server = Server(postgres.url, tmp_path, clear_interval=0.5)
    server.env["BROKER_NODE_TIMEOUT_S"] = str(timeout)
    server.start()
    config = AgentConfig(
        broker=server.base,
        api_key=prov_key,
        name="outage-node",
        region="europe-west4",
        country="NL",
        lat=53.44,
        lon=6.84,
        prices=parse_prices(["cpu=0.10"]),
        adapter="cpu",
        options=registry.Options(cpu_slots=1),
        poll_seconds=0.5,
    )
    node = NodeAgent(config)
    stop = threading.Event()
    agent = threading.Thread(target=node.run, args=(stop,), daemon=True)
    developer = Client(server.base, dev_key, retries=8)
    try:
        agent.start()
        (offer,) = _wait(
            lambda: developer.http.json("GET", "/v1/offers")["items"], 120, "the node's offer"
        )
        job = developer.submit(
            step,
            (jnp.ones((64, 64)) * 0.01, jnp.int32(0)),
            jnp.eye(64) * 0.5,
            steps=300_000,  # about 30 s here
            checkpoint_every=100_000,
            max_price_per_hour=1.0,
        )
        _wait(lambda: job.refresh().data["steps_done"] > 0, 120, "the job to run")

        postgres.stop()
        time.sleep(3 * timeout)  # three node timeouts without a heartbeat reaching it
        assert agent.is_alive()
        postgres.start()

        job.wait(timeout=300, poll=0.5, progress=False)
        done = job.data
        assert done["state"] == "succeeded"
        assert done["attempts"] == 1  # never handed back to the market
        assert done["steps_done"] == 300_000
        engine = make_engine(postgres.url)
        with transaction(engine, write=False) as session:
            (row,) = session.scalars(select(Node)).all()
            assert row.status == "online"
        engine.dispose()
        # The same offer throughout: the node was never declared lost (which
        # withdraws its offers; the agent would then publish new ones).
        (after,) = developer.http.json("GET", "/v1/offers")["items"]
        assert after["id"] == offer["id"]
    finally:
        stop.set()
        agent.join(timeout=60)
        developer.close()
        server.stop()
