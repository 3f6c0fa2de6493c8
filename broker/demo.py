"""The demo market that `make run` starts beside the broker (`broker serve --demo`).

Providers list capacity at real cloud prices in real regions, taken from
``benchmarks/data/prices.csv`` and ``regions.csv`` (rows of the SkyPilot catalog;
their sources are in ``benchmarks/data/SOURCES.md``). This machine is none of
that hardware, so those providers' agents run with ``--adapter emulated``: their
offers say ``emulated: true`` everywhere, and their jobs run on this machine's
CPU. One more agent offers this machine's CPU for real. Demo developers then
submit real JAX programs through the SDK: a small MLP trained as an iterative
job with checkpoints, a batch inference with a latency target, and a job whose
data must stay in the EU. Finished work is invoiced on demand, so the
dashboard shows bids, matches, running jobs, results and invoices within a
minute.

Run it against a broker that allows emulated offers (``serve --demo`` sets
``BROKER_ALLOW_EMULATION=1``): ``python -m broker.demo --url http://127.0.0.1:8000``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from broker.models.account import Account, Role

log = logging.getLogger("broker.demo")

DATA = Path(__file__).resolve().parent.parent / "benchmarks" / "data"
EU = ["AT", "BE", "DE", "DK", "ES", "FI", "FR", "IE", "IT", "NL", "PL", "SE"]


@dataclass(frozen=True, slots=True)
class Capacity:
    """One demo provider: a catalog model from a price row of one cloud region."""

    account: str
    model: str  # catalog key
    count: int
    cloud: str
    region: str
    row_name: str  # the accelerator as the price file spells it
    price: Decimal | None = None  # only where no cloud sells it (edge boards)


PROVIDERS = (
    Capacity("demo-nvidia-aws", "h100-sxm", 8, "aws", "us-east-1", "H100"),
    Capacity("demo-nvidia-gcp", "a100-80gb", 4, "gcp", "europe-west4", "A100-80GB"),
    Capacity("demo-amd-oci", "mi300x", 8, "oci", "af-johannesburg-1", "MI300X"),
    Capacity("demo-tpu-gcp", "tpu-v5e", 8, "gcp", "us-east1", "TPU-v5e"),
    # No cloud rents Jetson time, so this price is the demo's own, and says so.
    Capacity("demo-edge", "jetson-agx-orin", 2, "gcp", "europe-west3", "-", Decimal("0.15")),
)
CPU_PRICE = Decimal("0.05")


@dataclass(frozen=True, slots=True)
class Listing:
    capacity: Capacity
    price: Decimal  # USD per accelerator-hour
    country: str
    lat: float
    lon: float
    source: str


def _rows(name: str) -> list[dict[str, str]]:
    with (DATA / name).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def listings() -> list[Listing]:
    """Each demo provider at its region's real price per accelerator-hour."""
    places = {(r["cloud"], r["region"]): r for r in _rows("regions.csv")}
    prices = _rows("prices.csv")
    out = []
    for cap in PROVIDERS:
        place = places[(cap.cloud, cap.region)]
        if cap.price is not None:
            price, source = cap.price, "demo price: no cloud rents this board"
        else:
            row = min(
                (
                    r
                    for r in prices
                    if (r["cloud"], r["region"], r["accelerator"])
                    == (cap.cloud, cap.region, cap.row_name)
                    and r["price_per_hour_usd"]
                ),
                key=lambda r: int(r["accelerator_count"]),
            )
            per_chip = Decimal(row["price_per_hour_usd"]) / int(row["accelerator_count"])
            price, source = per_chip.quantize(Decimal("0.000001")), row["source"]
        out.append(
            Listing(cap, price, place["country"], float(place["lat"]), float(place["lon"]), source)
        )
    return out


# ---- accounts -----------------------------------------------------------------------


def demo_keys() -> dict[str, str]:
    """A fresh API key for each demo account, creating the accounts the first time; the
    keys an earlier start printed are revoked (its agents' node keys go when they
    register again)."""
    from sqlalchemy import select, update

    from broker.accounts.service import create_account, issue_key
    from broker.db import session_scope, utcnow
    from broker.models.account import ApiKey

    wanted = {cap.account: Role.provider for cap in PROVIDERS}
    wanted |= {"demo-cpu": Role.provider, "demo-admin": Role.admin}
    wanted |= {name: Role.developer for name in DEVELOPERS}
    keys = {}
    with session_scope() as session:
        for name, role in wanted.items():
            account = session.scalar(select(Account).where(Account.name == name))
            if account is None:
                _, keys[name] = create_account(session, name, role)
            else:
                session.execute(
                    update(ApiKey)
                    .where(
                        ApiKey.account_id == account.id,
                        ApiKey.node_id.is_(None),
                        ApiKey.revoked_at.is_(None),
                    )
                    .values(revoked_at=utcnow())
                )
                keys[name] = issue_key(session, account)
    return keys


# ---- providers: one agent process each ----------------------------------------------


def start_agents(url: str, keys: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    """One agent process per demo provider and one for this machine's CPU; each dies
    with the demo should the demo be killed."""
    from broker.supervise import die_with_parent

    agents = []
    # Each agent's key in its environment, never in its arguments (which `ps` shows to
    # every user of the machine).
    env = {k: v for k, v in os.environ.items() if k != "BROKER_API_KEY_FILE"}
    base = [
        sys.executable,
        "-m",
        "broker.cli",
        "agent",
        "--broker",
        url,
        "--discover-seconds",
        "600",
        # Short polls: a stopping agent notices within a second and signs off.
        "--poll-seconds",
        "1",
    ]
    for item in listings():
        cap = item.capacity
        argv = [
            *base,
            "--name", cap.account.removeprefix("demo-"),
            "--adapter", "emulated",
            "--emulate", f"{cap.model}={cap.count}",
            "--price", f"{cap.model}={item.price}",
            "--region", cap.region,
            "--country", item.country,
            "--lat", str(item.lat),
            "--lon", str(item.lon),
        ]  # fmt: skip
        key = {"BROKER_API_KEY": keys[cap.account]}
        agents.append(
            subprocess.Popen(argv, env={**env, **key}, preexec_fn=die_with_parent)  # noqa: S603 - our own CLI; no other thread yet
        )
    cpu = [
        *base,
        "--name", "this-machine",
        "--adapter", "cpu",
        "--cpu-slots", "2",
        "--price", f"cpu={CPU_PRICE}",
        "--region", "local",
        "--country", "NL",
        "--lat", "52.37",
        "--lon", "4.90",
    ]  # fmt: skip
    cpu_env = {**env, "BROKER_API_KEY": keys["demo-cpu"]}
    agents.append(subprocess.Popen(cpu, env=cpu_env, preexec_fn=die_with_parent))  # noqa: S603 - our own CLI
    return agents


# ---- developers ---------------------------------------------------------------------

DEVELOPERS = ("demo-ml-team", "demo-inference", "demo-eu-lab")


def _mlp_step(state: Any, x: Any, y: Any) -> Any:
    import jax
    import jax.numpy as jnp

    def loss(params: Any) -> Any:
        w1, w2 = params
        return jnp.mean((jnp.tanh(x @ w1) @ w2 - y) ** 2)

    params, step = state
    grads = jax.grad(loss)(params)
    return tuple(p - 0.05 * g for p, g in zip(params, grads, strict=True)), step + 1


def _infer(params: Any, batch: Any) -> Any:
    import jax.numpy as jnp

    w1, w2 = params
    return jnp.argmax(jnp.tanh(batch @ w1) @ w2, axis=-1)


def _inputs(seed: int) -> tuple[Any, Any, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (32, 64)).astype("float32")
    w2 = rng.normal(0, 0.3, (64, 4)).astype("float32")
    x = rng.normal(size=(256, 32)).astype("float32")
    y = np.eye(4, dtype="float32")[rng.integers(0, 4, 256)]
    return (w1, w2), x, y


def submit_round(url: str, keys: dict[str, str], n: int) -> None:
    """One wave of demo work: training, inference near its users, EU-only analysis."""
    import numpy as np

    from broker.sdk import Client

    params, x, y = _inputs(n)
    with Client(url, keys["demo-ml-team"]) as ml:
        ml.submit(
            _mlp_step,
            (params, np.int32(0)),
            x,
            y,
            # Long enough (some seconds on 4 accelerators) that its invoice line shows
            # cents, not $0.00.
            steps=100_000,
            checkpoint_every=10_000,
            name=f"mlp-train-{n}",
            # A team that wants big-memory accelerators and pays for them.
            accelerators=4,
            min_memory_gib=80,
            max_price_per_hour=8.0,
            budget_usd=5,
            deadline_hours=2,
        )
    with Client(url, keys["demo-inference"]) as inference:
        inference.submit(
            _infer,
            params,
            x,
            name=f"batch-inference-{n}",
            max_price_per_hour=2.5,
            user_lat=50.11,  # users in Frankfurt
            user_lon=8.68,
            latency_slo_ms=60,
        )
    with Client(url, keys["demo-eu-lab"]) as eu:
        eu.submit(
            _infer,
            params,
            x,
            name=f"eu-only-analysis-{n}",
            max_price_per_hour=3.0,
            allowed_countries=EU,
            data_region="europe-west4",
            data_gb=50,
        )


def invoice_all(url: str, keys: dict[str, str]) -> int:
    from broker.sdk import Client

    made = 0
    for name in DEVELOPERS:
        with Client(url, keys[name]) as client:
            made += len(client.generate_invoice())
    return made


def _wait_for(url: str, stop: threading.Event, timeout: float = 120) -> bool:
    """Whether the broker answered ``/readyz`` before ``timeout`` (False: stopped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        if stop.wait(0.5):
            return False
    raise SystemExit(f"demo: the broker at {url} did not answer within {timeout:g} s")


def keys_file() -> Path:
    """Where the demo writes its accounts' keys: ``var/demo-keys.txt`` by default."""
    from broker.config import get_settings

    return get_settings().data_dir / "demo-keys.txt"


def save_keys(keys: dict[str, str], url: str) -> Path:
    """Write the keys to ``keys_file()``, readable by this user only (they sign in as
    any demo account), replacing the previous start's, which no longer work."""
    path = keys_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Demo API keys for {url}, written {time.strftime('%Y-%m-%d %H:%M:%S')}."]
    lines.append("# Each start of the demo replaces them; the previous ones are revoked.")
    lines += [f"{name} {key}" for name, key in keys.items()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write("\n".join(lines) + "\n")
    return path


def print_keys(keys: dict[str, str], url: str, path: Path, heading: str) -> None:
    print(f"\n{heading}", flush=True)
    print(f"  dashboard: {url}/    API reference: {url}/docs")
    print(f"  sign in with one of these keys (also in {path}):")
    for name, key in keys.items():
        print(f"    {name:20s} {key}")
    print("  Emulated providers run their jobs on this machine's CPU and are labelled so.\n")
    sys.stdout.flush()


def _market_up(url: str, admin_key: str, stop: threading.Event, timeout: float = 90) -> int:
    """Wait until every demo agent has listed its offers; the offers listed then."""
    wanted = len(PROVIDERS) + 1
    deadline = time.monotonic() + timeout
    listed = 0
    while time.monotonic() < deadline and not stop.is_set():
        try:
            answer = httpx.get(
                f"{url}/v1/offers",
                params={"limit": 50},
                headers={"Authorization": f"Bearer {admin_key}"},
                timeout=5,
            )
            if answer.status_code == 200:
                listed = len(answer.json()["items"])
                if listed >= wanted:
                    break
        except httpx.TransportError:
            pass
        stop.wait(2.0)
    return listed


def _keep_busy(
    url: str, keys: dict[str, str], stop: threading.Event, waves: int, every: float
) -> None:
    for wave in range(waves):
        if stop.is_set():
            return
        try:
            submit_round(url, keys, wave)
        except Exception as exc:
            log.warning("submitting demo wave %d failed: %s", wave, exc)
        if stop.wait(every / 2):
            return
        try:
            invoice_all(url, keys)
        except Exception as exc:
            log.warning("invoicing failed: %s", exc)
        stop.wait(every / 2)
    while not stop.wait(every):
        try:
            invoice_all(url, keys)
        except Exception as exc:
            log.warning("invoicing failed: %s", exc)


AGENTS_STOP_SECONDS = 3.0  # agents sign off within this; then they are killed


def stop_agents(
    agents: list[subprocess.Popen[bytes]], seconds: float = AGENTS_STOP_SECONDS
) -> None:
    """SIGTERM every agent (each stops its runs and signs its node off), wait up to
    ``seconds`` for them all, then kill those still running."""
    for agent in agents:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + seconds
    for agent in agents:
        try:
            agent.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("agent %d did not stop in %.1f s; killing it", agent.pid, seconds)
            agent.kill()
            agent.wait()


def run(url: str, stop: threading.Event, waves: int = 6, every: float = 30.0) -> None:
    """Set the demo market up, then keep it busy (in a thread) until ``stop``; then
    stop the agents, which sign off while the broker still answers."""
    if not _wait_for(url, stop):
        return
    keys = demo_keys()
    path = save_keys(keys, url)
    print_keys(keys, url, path, f"Demo market starting at {url}")
    agents = start_agents(url, keys)
    try:
        busy = threading.Thread(
            target=_keep_busy, args=(url, keys, stop, waves, every), name="demo", daemon=True
        )
        busy.start()
        listed = _market_up(url, keys["demo-admin"], stop)
        if not stop.is_set():
            print_keys(keys, url, path, f"The demo market is up: {listed} offers listed.")
        while not stop.wait(0.5):
            pass
    finally:
        stop.set()
        stop_agents(agents)


def main(argv: list[str] | None = None) -> None:
    # Packaging lowers for every platform without their hardware; no backend probing.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--waves", type=int, default=6, help="waves of demo jobs")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between waves")
    args = parser.parse_args(argv)
    from broker.logformat import configure_text_logging

    configure_text_logging()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run(args.url.rstrip("/"), stop, args.waves, args.every)


if __name__ == "__main__":
    main()
