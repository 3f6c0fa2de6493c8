"""Clearing benchmark: the solver against its LP bound and the peer baseline.

    python -m benchmarks.solver                 # the issue's sizes
    python -m benchmarks.solver --sizes 200x50 2000x500 --time-limit 10

Markets come from real data (benchmarks/data, see its SOURCES.md): asks from
the cloud price sample at real region coordinates with datasheet specs, jobs
from the Alibaba GPU trace's sizes and durations, with bids, deadlines, latency
targets, data locality and residency added by benchmarks/markets.py.

Each size runs in its own process so that its peak memory is its own. Printed
per size: feasible pairs, objective, LP bound, gap to the bound, the
first-come-first-served baseline's objective, the ratio to it, solve seconds
and peak memory (the process's maximum resident set).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

from benchmarks.markets import build_market

DEFAULT_SIZES = ["2000x500", "20000x5000"]
TIME_LIMITS = {"2000x500": 10.0, "20000x5000": 60.0}


def run_one(n_jobs: int, n_offers: int, seed: int, time_limit: float) -> dict[str, Any]:
    from solver import first_come_first_served, solve

    market = build_market(n_jobs, n_offers, seed=seed)
    baseline = first_come_first_served(market)
    started = time.perf_counter()
    result = solve(market, time_limit=time_limit)
    wall = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "size": f"{n_jobs}x{n_offers}",
        "seed": seed,
        "feasible_pairs": int(result.stats.get("feasible_pairs", 0)),
        "status": result.status,
        "objective": result.objective,
        "bound": result.bound,
        "gap": result.gap,
        "baseline": baseline.objective,
        "ratio": result.objective / baseline.objective if baseline.objective else None,
        "matched": len(result.assignments),
        "baseline_matched": len(baseline.assignments),
        "solve_seconds": wall,
        "peak_mib": peak_mib,
        "time_limit": time_limit,
    }


def _print(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'size':>11} {'pairs':>11} {'objective':>14} {'LP bound':>14} {'gap':>8} "
        f"{'baseline':>14} {'ratio':>6} {'matched':>9} {'seconds':>8} {'peak MiB':>9}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['size']:>11} {r['feasible_pairs']:>11,} {r['objective']:>14,.0f} "
            f"{r['bound']:>14,.0f} {100 * r['gap']:>7.3f}% {r['baseline']:>14,.0f} "
            f"{r['ratio']:>6.3f} {r['matched']:>4}/{r['baseline_matched']:<4} "
            f"{r['solve_seconds']:>8.1f} {r['peak_mib']:>9,.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="JOBSxOFFERS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=None, help="default: per size")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead")
    args = parser.parse_args()

    if args.one:
        n, m = (int(x) for x in args.one.split("x"))
        limit = args.time_limit or TIME_LIMITS.get(args.one, 10.0)
        print(json.dumps(run_one(n, m, args.seed, limit)))
        return

    rows = []
    for size in args.sizes:
        command = [
            sys.executable,
            "-m",
            "benchmarks.solver",
            "--one",
            size,
            "--seed",
            str(args.seed),
        ]
        if args.time_limit:
            command += ["--time-limit", str(args.time_limit)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)  # noqa: S603
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print(rows)
        print("(matched: jobs placed by the solver / by the baseline; ratio: objective / baseline)")


if __name__ == "__main__":
    main()
