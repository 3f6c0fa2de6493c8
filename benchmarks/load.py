"""Load benchmark: real ``broker serve`` processes on 127.0.0.1, driven over HTTP.

    python -m benchmarks.load                          # SQLite and PostgreSQL, the issue's sizes
    python -m benchmarks.load --database postgres --repeat 3
    python -m benchmarks.load --quick                  # small and short: a smoke run

Three phases, each on a fresh, migrated database (SQLite in a temporary
directory; PostgreSQL in a throwaway cluster started as
``scripts/with-postgres.sh`` does, but with its durable defaults: fsync and
synchronous commit on):

- **submit**: ``POST /v1/jobs`` with realistic bodies and an Idempotency-Key each
  (as the SDK sends them) while clearing rounds run every ``--clear-interval``
  seconds against 5,000 offers; first as fast as ``--concurrency`` clients go
  (closed loop), then at fixed ``--rates`` (open loop: latency counted from when
  each request was due, so a server that falls behind pays for its queue).
- **read**: ``GET /v1/market/book`` and ``GET /v1/offers`` (a mix of filters)
  with 10,000 open jobs and 5,000 offers, clearing off so the book stays that size.
- **clear**: one round (``POST /v1/market/clear``) over 20,000 open jobs and
  5,000 offers: read, solve, write the allocations.

Jobs and offers come from ``benchmarks.markets`` (real prices, regions and a job
trace; see ``benchmarks/data/SOURCES.md``), stored through the broker's own
services. The load comes from separate processes (``benchmarks.loadgen``). For
each measurement the report gives the CPU that the server, PostgreSQL, the load
generator and everything else on the machine used (in cores), and the time the
hypervisor took for other guests (steal), so a saturated generator or a busy or
shared machine shows.

The servers, the PostgreSQL cluster and the CPU accounting are in
``benchmarks.processes``; the request bodies and the seeding in ``benchmarks.seeding``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

from benchmarks.loadgen import Plan, Request
from benchmarks.markets import build_market
from benchmarks.processes import CpuMeter, Postgres, Server
from benchmarks.seeding import Keys, job_body, migrate, region_name, seed
from solver import market as sm


@dataclass(frozen=True)
class Sizes:
    offers: int = 5_000
    book_jobs: int = 10_000
    clear_jobs: int = 20_000
    duration: float = 20.0
    warmup: float = 3.0


QUICK = Sizes(offers=100, book_jobs=200, clear_jobs=300, duration=3.0, warmup=0.5)


# --- load --------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


def run_plans(plans: list[Plan]) -> list[dict[str, Any]]:
    """One load generator process per plan, all at once; what each saw."""
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.loadgen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in plans
    ]
    try:
        # Every generator gets its plan before any is waited for, so they run side by side.
        for run, plan in zip(runs, plans, strict=True):
            assert run.stdin is not None
            run.stdin.write(json.dumps(plan))
            run.stdin.close()
        outputs = []
        for run in runs:
            assert run.stdout is not None
            with run.stdout:
                outputs.append(run.stdout.read())
            run.wait()
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    if any(r.returncode for r in runs):
        raise RuntimeError("a load generator failed")
    return [json.loads(out) for out in outputs]


def generate(plan: Plan, processes: int) -> dict[str, Any]:
    """Run ``processes`` load generators side by side and merge what they saw."""
    share: Plan = {
        **plan,
        "concurrency": max(1, plan["concurrency"] // processes),
        "rate": None if plan["rate"] is None else plan["rate"] / processes,
    }
    results = run_plans([share] * processes)
    latencies = sorted(x for r in results for x in r["latencies"])
    statuses: Counter[str] = Counter()
    for r in results:
        statuses.update(r["statuses"])
    window = plan["duration"]
    ok = sum(n for s, n in statuses.items() if s.startswith("2"))
    finished = sum(r["finished"] for r in results)
    return {
        "requests": len(latencies),
        "per_second": min(ok, finished) / window,
        "p50_ms": 1000 * percentile(latencies, 0.50),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "max_ms": 1000 * (latencies[-1] if latencies else float("nan")),
        "errors": {s: n for s, n in statuses.items() if not s.startswith("2")},
        "generator_cores": sum(r["cpu_seconds"] for r in results) / window,
    }


def measure(
    server: Server, pg: int | None, plan: Plan, processes: int, label: str
) -> dict[str, Any]:
    assert server.process is not None
    with CpuMeter(server.process.pid, pg) as meter:
        load = os.getloadavg()[0]
        figures = generate(plan, processes)
    figures["cores"] = meter.cores
    # CPU per answered request, which other work on the machine hardly changes.
    answered = max(1.0, figures["per_second"])
    figures["cpu_ms"] = {n: 1000 * c / answered for n, c in meter.cores.items()}
    figures["cpu_ms"]["generator"] = 1000 * figures["generator_cores"] / answered
    figures["load_before"] = load
    figures["label"] = label
    _print_line(figures)
    return figures


def _print_line(f: dict[str, Any]) -> None:
    cores = f["cores"]
    pg = f"  postgres {cores['postgres']:.2f}" if "postgres" in cores else ""
    others = cores["machine"] - cores["server"] - cores.get("postgres", 0) - f["generator_cores"]
    errors = f" errors {f['errors']}" if f["errors"] else ""
    ms = f["cpu_ms"]
    pg_ms = f" + postgres {ms['postgres']:.1f}" if "postgres" in ms else ""
    print(
        f"  {f['label']:<26} {f['per_second']:>7.1f}/s  p50 {f['p50_ms']:>7.1f} ms  "
        f"p99 {f['p99_ms']:>7.1f} ms | cores: server {cores['server']:.2f}{pg}  "
        f"generator {f['generator_cores']:.2f}  others {max(0.0, others):.2f}  "
        f"stolen {cores['stolen']:.2f} | "
        f"CPU ms/request: server {ms['server']:.1f}{pg_ms}{errors}",
        flush=True,
    )


def _plan(
    base: str,
    requests: list[Request],
    keys: list[str],
    sizes: Sizes,
    *,
    concurrency: int,
    rate: float | None = None,
    idempotency: bool = False,
    timeout: float = 30.0,
) -> Plan:
    return {
        "base": base,
        "requests": requests,
        "keys": keys,
        "concurrency": concurrency,
        "rate": rate,
        "duration": sizes.duration,
        "warmup": sizes.warmup,
        "idempotency": idempotency,
        "timeout": timeout,
    }


@dataclass
class Options:
    workers: int
    sizes: Sizes
    concurrency: int
    rates: list[float]
    generators: int
    clear_interval: float
    read_concurrency: int
    access_log: bool = False


class Bench:
    """One database kind: fresh databases, servers and the three phases."""

    def __init__(self, kind: str, workdir: Path, options: Options) -> None:
        self.kind = kind
        self.workdir = workdir
        self.options = options
        self.postgres: Postgres | None = None
        self.count = 0

    def __enter__(self) -> Bench:
        if self.kind == "postgres":
            self.postgres = Postgres()
            self.postgres.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.postgres:
            self.postgres.stop()

    def fresh(self, market: sm.Market) -> tuple[str, Path, Keys]:
        self.count += 1
        data_dir = self.workdir / f"{self.kind}-{self.count}"
        data_dir.mkdir()
        if self.postgres:
            url = self.postgres.fresh_database()
        else:
            url = f"sqlite:///{data_dir / 'broker.db'}"
        migrate(url, data_dir)
        started = time.monotonic()
        keys = seed(url, market)
        print(
            f"  (seeded {len(market.offers)} offers, {len(market.jobs)} jobs "
            f"in {time.monotonic() - started:.1f} s)",
            flush=True,
        )
        return url, data_dir, keys

    def server(self, url: str, data_dir: Path, **env: str) -> Server:
        return Server(url, data_dir, self.options.workers, env, self.options.access_log)

    @property
    def pg_pid(self) -> int | None:
        return self.postgres.pid() if self.postgres else None

    def submit(self) -> dict[str, Any]:
        o = self.options
        market = build_market(0, o.sizes.offers, seed=1)
        url, data_dir, keys = self.fresh(market)
        # Bodies for the submissions: the trace's jobs bidding against these offers.
        bodies = build_market(20_000, o.sizes.offers, seed=1).jobs
        requests: list[Request] = [
            {"method": "POST", "path": "/v1/jobs", "body": json.dumps(job_body(j))} for j in bodies
        ]
        env = {"BROKER_CLEAR_INTERVAL_SECONDS": str(o.clear_interval)}
        figures: dict[str, Any] = {}
        with self.server(url, data_dir, **env) as server:

            def submissions(concurrency: int, rate: float | None, label: str) -> dict[str, Any]:
                plan = _plan(
                    server.base,
                    requests,
                    keys.developers,
                    o.sizes,
                    concurrency=concurrency,
                    rate=rate,
                    idempotency=True,
                )
                return measure(server, self.pg_pid, plan, o.generators, label)

            before = _rounds(server.base, keys.admin)
            figures["max"] = submissions(o.concurrency, None, f"submit, {o.concurrency} clients")
            for rate in o.rates:
                figures[f"rate_{rate:g}"] = submissions(
                    max(o.concurrency, 64), rate, f"submit, {rate:g}/s offered"
                )
            after = _rounds(server.base, keys.admin)
        figures["rounds"] = after["total"] - before["total"]
        figures["matched"] = sum(r["matched"] or 0 for r in after["items"][: figures["rounds"]])
        print(f"  (clearing rounds during the submissions: {figures['rounds']})", flush=True)
        return figures

    def read(self) -> dict[str, Any]:
        o = self.options
        market = build_market(o.sizes.book_jobs, o.sizes.offers, seed=2)
        url, data_dir, keys = self.fresh(market)
        rng = random.Random(2)
        models = sorted({x.accelerator for x in market.offers})
        regions = sorted({region_name(x.region) for x in market.offers})
        prices = sorted(x.price_per_hour for x in market.offers)
        median_price = f"{prices[len(prices) // 2]:.2f}"
        searches = []
        for _ in range(200):
            query: dict[str, object] = rng.choice(
                [
                    {},
                    {"accelerator": rng.choice(models), "sort": "price"},
                    {"region": rng.choice(regions)},
                    {"platform": "cuda", "min_memory_gib": 40, "max_price": median_price},
                    {"accelerator": rng.choice(models), "min_count": 2, "limit": 20},
                ]
            )
            searches.append(f"/v1/offers?{urlencode(query)}" if query else "/v1/offers")
        # Mostly the whole book, as a market screen polls it; some one model's.
        books = ["/v1/market/book"] * 4 + [f"/v1/market/book?accelerator={m}" for m in models[:4]]
        figures: dict[str, Any] = {}
        with self.server(url, data_dir, BROKER_CLEAR_INTERVAL_SECONDS="0") as server:
            for name, paths in (("book", books), ("search", searches)):
                requests: list[Request] = [
                    {"method": "GET", "path": p, "body": None} for p in paths
                ]
                for concurrency in (1, o.read_concurrency):
                    figures[f"{name}_{concurrency}"] = measure(
                        server,
                        self.pg_pid,
                        _plan(
                            server.base,
                            requests,
                            keys.developers,
                            o.sizes,
                            concurrency=concurrency,
                        ),
                        1,
                        f"{name}, {concurrency} client{'s' if concurrency > 1 else ''}",
                    )
        return figures

    def clear(self) -> dict[str, Any]:
        o = self.options
        market = build_market(o.sizes.clear_jobs, o.sizes.offers, seed=0)
        url, data_dir, keys = self.fresh(market)
        env = {"BROKER_CLEAR_INTERVAL_SECONDS": "0", "BROKER_CLEAR_TIME_LIMIT_SECONDS": "60"}
        with self.server(url, data_dir, **env) as server:
            assert server.process is not None
            with (
                CpuMeter(server.process.pid, self.pg_pid) as meter,
                httpx.Client(base_url=server.base, timeout=600) as client,
            ):
                started = time.time()
                response = client.post(
                    "/v1/market/clear", headers={"Authorization": f"Bearer {keys.admin}"}
                )
                seconds = time.time() - started
            response.raise_for_status()
            record = response.json()
        figures = {
            "seconds": seconds,
            "solve_seconds": record["solve_seconds"],
            "matched": record["matched"],
            "stale": record["stale"],
            "status": record["status"],
            "gap": record["gap"],
            "cores": meter.cores,
        }
        print(
            f"  clearing round {len(market.jobs)} jobs x {len(market.offers)} offers: "
            f"{seconds:.1f} s end to end, solve {record['solve_seconds']:.1f} s, "
            f"matched {record['matched']}, stale {record['stale']}, {record['status']}, "
            f"gap {100 * (record['gap'] or 0):.2f}%",
            flush=True,
        )
        return figures


def _rounds(base: str, admin: str) -> dict[str, Any]:
    response = httpx.get(
        f"{base}/v1/market/rounds?limit=200",
        headers={"Authorization": f"Bearer {admin}"},
        timeout=30,
    )
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


# --- report ------------------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def summary(kind: str, runs: list[dict[str, Any]]) -> None:
    """Median and range over the repeats, per figure."""
    print(f"\n{kind}: median (min-max) over {len(runs)} run(s)")

    def line(label: str, phase: str, key: str) -> None:
        got = [r[phase][key] for r in runs if phase in r and key in r[phase]]
        if got:
            rate = _spread([g["per_second"] for g in got])
            p50 = _spread([g["p50_ms"] for g in got])
            p99 = _spread([g["p99_ms"] for g in got])
            print(f"  {label:<30} {rate:>22}/s  p50 {p50:>20} ms  p99 {p99:>20} ms")

    for r in runs[:1]:
        for key in r.get("submit", {}):
            if key == "max":
                line("submit, closed loop", "submit", key)
            elif key.startswith("rate_"):
                line(f"submit, {key[5:]}/s offered", "submit", key)
        for key in r.get("read", {}):
            line(key.replace("_", ", c="), "read", key)
    clears = [r["clear"] for r in runs if "clear" in r]
    if clears:
        total = _spread([c["seconds"] for c in clears])
        solve = _spread([c["solve_seconds"] for c in clears])
        print(f"  {'clearing round':<30} {total:>22} s end to end, solve {solve} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="small and short: a smoke run")
    parser.add_argument("--phases", default="submit,read,clear", help="comma-separated")
    parser.add_argument("--workers", type=int, default=None, help="default: broker serve's")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--duration", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    parser.add_argument(
        "--rates", default="100,250,400,500", help="open-loop submissions/s, comma-separated"
    )
    parser.add_argument("--generators", type=int, default=1, help="load generator processes")
    parser.add_argument("--read-concurrency", type=int, default=8)
    parser.add_argument("--clear-interval", type=float, default=2.0)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)

    from broker.cli import recommended_workers

    sizes = QUICK if args.quick else Sizes()
    if args.duration:
        sizes = Sizes(**{**sizes.__dict__, "duration": args.duration})
    options = Options(
        workers=args.workers or recommended_workers(),
        sizes=sizes,
        concurrency=args.concurrency,
        rates=[float(r) for r in args.rates.split(",")] if not args.quick else [50.0],
        generators=args.generators,
        clear_interval=args.clear_interval,
        read_concurrency=args.read_concurrency,
    )
    phases = args.phases.split(",")
    kinds = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    print(
        f"{os.cpu_count()} cores, {options.workers} worker(s); load average "
        f"{os.getloadavg()[0]:.2f} at the start",
        flush=True,
    )
    results: dict[str, list[dict[str, Any]]] = {}
    for kind in kinds:
        for repeat in range(args.repeat):
            print(f"\n{kind}, run {repeat + 1} of {args.repeat}", flush=True)
            with (
                tempfile.TemporaryDirectory(prefix="broker-load-") as tmp,
                Bench(kind, Path(tmp), options) as bench,
            ):
                run = {phase: getattr(bench, phase)() for phase in phases}
            results.setdefault(kind, []).append(run)
    for kind, runs in results.items():
        summary(kind, runs)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
