"""Replica benchmark: the load benchmark's mixed workload against 1, 2 and 3
``broker serve`` replicas on one PostgreSQL, behind a round-robin proxy.

    python -m benchmarks.replicas                    # 1, 2 and 3 replicas, 40 s each
    python -m benchmarks.replicas --replicas 1,3 --duration 30
    python -m benchmarks.replicas --quick            # small and short: a smoke run

For each replica count: a fresh, migrated database in a throwaway PostgreSQL
cluster on 127.0.0.1 (``benchmarks.processes.Postgres``, durable defaults),
seeded with accounts and offers through the broker's services; nodes registered
over HTTP, each publishing an offer; then N replicas (``broker serve``, one
worker each unless ``--workers``) with the settings a replicated deployment has
on PostgreSQL (rate limits counted in the database, periodic work by lease,
clearing every ``--clear-interval`` seconds) behind ``benchmarks.proxy`` in a
process of its own. Load generators (``benchmarks.loadgen``), one per kind of
request and all at once, each a closed loop of a fixed number of clients:

- **submit**: ``POST /v1/jobs`` with an Idempotency-Key (developers);
- **book**: ``GET /v1/market/book`` (developers);
- **heartbeat**: ``POST /v1/nodes/{id}/heartbeat`` (each node with its node key);
- **poll**: ``GET /v1/allocations`` (each node asking for its work).

The report gives, per replica count, requests/s, p50 and p99 latency and errors
per kind, the clearing rounds run meanwhile, and the CPU (in cores) of each
replica, the proxy, PostgreSQL, the load generators and the whole machine, so
what saturates shows. All processes stop on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from benchmarks.load import percentile, run_plans
from benchmarks.loadgen import Plan, Request
from benchmarks.markets import build_market
from benchmarks.processes import CpuMeter, Postgres, Server
from benchmarks.seeding import Keys, job_body, migrate, seed

KINDS = ("submit", "book", "heartbeat", "poll")


@dataclass(frozen=True)
class Sizes:
    offers: int = 2_000
    nodes: int = 60
    duration: float = 40.0
    warmup: float = 3.0
    clients: tuple[int, int, int, int] = (8, 2, 4, 4)  # per kind, as KINDS


QUICK = Sizes(offers=100, nodes=6, duration=3.0, warmup=0.5, clients=(2, 1, 1, 1))


def _send(client: httpx.Client, method: str, path: str, key: str, body: object) -> Any:
    """One request, again after the Retry-After of a 429: a key this replica has not
    seen yet counts against its address's anonymous limit, and every node here
    comes from 127.0.0.1."""
    while True:
        response = client.request(
            method, path, headers={"Authorization": f"Bearer {key}"}, json=body
        )
        if response.status_code != 429:
            response.raise_for_status()
            return response.json()
        time.sleep(float(response.headers.get("Retry-After", "1")))


def register_nodes(base: str, keys: Keys, count: int, accelerator: str) -> list[tuple[str, str]]:
    """``count`` nodes over HTTP, spread over the providers, each publishing one offer;
    their ids and node keys."""
    nodes = []
    with httpx.Client(base_url=base, timeout=30) as client:
        for i in range(count):
            provider = keys.providers[i % len(keys.providers)]
            registered = _send(
                client,
                "POST",
                "/v1/nodes",
                provider,
                {"name": f"node-{i}", "region": "eu-west", "country": "NL", "lat": 52.37}
                | {"lon": 4.9},
            )
            node_id, node_key = registered["node"]["id"], registered["api_key"]
            offer = {"accelerator": accelerator, "count": 8, "price_per_hour": "2"}
            _send(client, "PUT", f"/v1/nodes/{node_id}/offers", node_key, {"offers": [offer]})
            nodes.append((node_id, node_key))
    return nodes


def plans(base: str, keys: Keys, nodes: list[tuple[str, str]], sizes: Sizes) -> list[Plan]:
    """One closed-loop plan per kind (KINDS' order). The node kinds list one request
    per node and the node keys in the same order, so each node speaks for itself."""
    jobs = build_market(5_000, sizes.offers, seed=1).jobs
    requests: dict[str, list[Request]] = {
        "submit": [
            {"method": "POST", "path": "/v1/jobs", "body": json.dumps(job_body(j))} for j in jobs
        ],
        "book": [{"method": "GET", "path": "/v1/market/book", "body": None}],
        "heartbeat": [
            {"method": "POST", "path": f"/v1/nodes/{n}/heartbeat", "body": "{}"} for n, _ in nodes
        ],
        "poll": [{"method": "GET", "path": "/v1/allocations", "body": None} for _ in nodes],
    }
    node_keys = [k for _, k in nodes]
    credentials = {
        "submit": keys.developers,
        "book": keys.developers,
        "heartbeat": node_keys,
        "poll": node_keys,
    }
    return [
        {
            "base": base,
            "requests": requests[kind],
            "keys": credentials[kind],
            "concurrency": clients,
            "rate": None,
            "duration": sizes.duration,
            "warmup": sizes.warmup,
            "idempotency": kind == "submit",
            "timeout": 30.0,
        }
        for kind, clients in zip(KINDS, sizes.clients, strict=True)
    ]


def figures(result: dict[str, Any], window: float) -> dict[str, Any]:
    latencies = sorted(result["latencies"])
    statuses: Counter[str] = Counter(result["statuses"])
    ok = sum(n for s, n in statuses.items() if s.startswith("2"))
    return {
        "per_second": min(ok, result["finished"]) / window,
        "p50_ms": 1000 * percentile(latencies, 0.50),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "errors": {s: n for s, n in statuses.items() if not s.startswith("2")},
    }


class Proxy:
    """``benchmarks.proxy`` in a process of its own, so its CPU counts apart."""

    def __init__(self, ports: list[int], log: Path) -> None:
        self.ports = ports
        self.log = log
        self.process: subprocess.Popen[str] | None = None
        self.base = ""

    def __enter__(self) -> Proxy:
        command = [sys.executable, "-m", "benchmarks.proxy"]
        command += [f"127.0.0.1:{p}" for p in self.ports]
        with self.log.open("w") as log:
            # Our own module; its shutdown's complaints go to its log.
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)  # noqa: S603
        assert self.process.stdout is not None
        try:
            self.base = self.process.stdout.readline().strip()
            if not self.base:
                raise RuntimeError("the proxy did not start")
        except BaseException:  # Ctrl-C too
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process and self.process.stdout:
            self.process.stdout.close()


def rounds(base: str, admin: str) -> int:
    response = httpx.get(
        f"{base}/v1/market/rounds?limit=1",
        headers={"Authorization": f"Bearer {admin}"},
        timeout=30,
    )
    response.raise_for_status()
    return int(response.json()["total"])


def run(
    postgres: Postgres, workdir: Path, replicas: int, sizes: Sizes, workers: int, interval: float
) -> dict[str, Any]:
    data_dir = workdir / f"replicas-{replicas}"
    data_dir.mkdir()
    url = postgres.fresh_database()
    migrate(url, data_dir)
    market = build_market(0, sizes.offers, seed=1)
    keys = seed(url, market)
    env = {"BROKER_CLEAR_INTERVAL_SECONDS": str(interval), "BROKER_RATE_LIMIT_STORE": "database"}
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(Server(url, data_dir, workers, env)) for _ in range(replicas)
        ]
        nodes = register_nodes(servers[0].base, keys, sizes.nodes, market.offers[0].accelerator)
        # Every replica learns every key first, as in a deployment that has run a
        # while: a key new to a process counts against its address's anonymous limit.
        for server in servers:
            with httpx.Client(base_url=server.base, timeout=30) as client:
                for _, node_key in nodes:
                    _send(client, "GET", "/v1/allocations", node_key, None)
                for developer in keys.developers:
                    _send(client, "GET", "/v1/jobs?limit=1", developer, None)
        proxy = stack.enter_context(Proxy([s.port for s in servers], data_dir / "proxy.log"))
        assert proxy.process is not None
        roots = {f"replica {i + 1}": s.process.pid for i, s in enumerate(servers) if s.process}
        roots["proxy"] = proxy.process.pid
        before = rounds(proxy.base, keys.admin)
        load = os.getloadavg()[0]
        with CpuMeter(None, postgres.pid(), roots) as meter:
            results = run_plans(plans(proxy.base, keys, nodes, sizes))
        cleared = rounds(proxy.base, keys.admin) - before
    window = sizes.duration
    kinds = {k: figures(r, window) for k, r in zip(KINDS, results, strict=True)}
    # A generator's CPU time runs over its warm-up and its window.
    generator_seconds = sum(r["cpu_seconds"] for r in results)
    report: dict[str, Any] = {
        "replicas": replicas,
        "kinds": kinds,
        "total_per_second": sum(f["per_second"] for f in kinds.values()),
        "rounds": cleared,
        "cores": {**meter.cores, "generators": generator_seconds / (window + sizes.warmup)},
        "load_before": load,
    }
    print_run(report)
    return report


def print_run(r: dict[str, Any]) -> None:
    print(
        f"\n{r['replicas']} replica(s): {r['total_per_second']:.1f} requests/s in all", flush=True
    )
    for kind, f in r["kinds"].items():
        errors = f"  errors {f['errors']}" if f["errors"] else ""
        print(
            f"  {kind:<10} {f['per_second']:>7.1f}/s  p50 {f['p50_ms']:>7.1f} ms  "
            f"p99 {f['p99_ms']:>7.1f} ms{errors}"
        )
    cores = "  ".join(f"{name} {value:.2f}" for name, value in r["cores"].items())
    print(f"  clearing rounds: {r['rounds']}\n  cores: {cores}", flush=True)


def markdown(reports: list[dict[str, Any]]) -> str:
    """The figures as a table for docs/benchmarks.md."""
    lines = [
        "| replicas | "
        + " | ".join(f"{k} /s (p50 / p99 ms)" for k in KINDS)
        + " | all /s | errors | rounds | cores: replicas | proxy | PostgreSQL | generators"
        " | others | machine (stolen) | CPU ms/request: replicas, PostgreSQL |",
        "|" + "---|" * (len(KINDS) + 11),
    ]
    for r in reports:
        kinds = [
            f"{f['per_second']:.0f} ({f['p50_ms']:.0f} / {f['p99_ms']:.0f})"
            for f in r["kinds"].values()
        ]
        errors = sum(n for f in r["kinds"].values() for n in f["errors"].values())
        c = r["cores"]
        replicas = [v for n, v in c.items() if n.startswith("replica")]
        each = " + ".join(f"{v:.2f}" for v in replicas)
        ours = sum(replicas) + c["proxy"] + c["postgres"] + c["generators"]
        # CPU per answered request: what a share of a busy machine hardly changes.
        answered = max(1.0, r["total_per_second"])
        lines.append(
            f"| {r['replicas']} | " + " | ".join(kinds) + f" | {r['total_per_second']:.0f} | "
            f"{errors} | {r['rounds']} | {each} | {c['proxy']:.2f} | {c['postgres']:.2f} | "
            f"{c['generators']:.2f} | {max(0.0, c['machine'] - ours):.2f} | "
            f"{c['machine']:.2f} ({c['stolen']:.2f}) | "
            f"{1000 * sum(replicas) / answered:.1f}, {1000 * c['postgres'] / answered:.1f} |"
        )
    return "\n".join(lines)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", default="1,2,3", help="replica counts, comma-separated")
    parser.add_argument("--quick", action="store_true", help="small and short: a smoke run")
    parser.add_argument("--duration", type=float, default=None, help="seconds per replica count")
    parser.add_argument("--workers", type=int, default=1, help="server processes per replica")
    parser.add_argument("--clear-interval", type=float, default=2.0)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    if args.duration:
        sizes = Sizes(**{**sizes.__dict__, "duration": args.duration})
    # SIGTERM unwinds as Ctrl-C does, so every server, the proxy and PostgreSQL stop.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where started ignoring it
    print(
        f"{os.cpu_count()} cores, {args.workers} worker(s) per replica; load average "
        f"{os.getloadavg()[0]:.2f} at the start",
        flush=True,
    )
    reports = []
    postgres = Postgres()
    try:
        postgres.start()
        with tempfile.TemporaryDirectory(prefix="broker-replicas-") as tmp:
            for count in (int(n) for n in args.replicas.split(",")):
                reports.append(
                    run(postgres, Path(tmp), count, sizes, args.workers, args.clear_interval)
                )
    except KeyboardInterrupt:
        print("interrupted: stopping the servers, the proxy and PostgreSQL", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        with contextlib.suppress(RuntimeError):
            postgres.stop()
    print("\n" + markdown(reports))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
