"""Clearing benchmark: the solver against its LP bound and the peer baseline.

    python -m benchmarks.solver                       # every market below
    python -m benchmarks.solver --sizes 2000x500 --markets trace gangs30

Markets come from real data (benchmarks/data, see its SOURCES.md): asks from
the cloud price sample at real region coordinates with datasheet specs, jobs
from the Alibaba GPU trace's sizes and durations, with bids, deadlines, latency
targets, data locality and residency added by benchmarks/markets.py.

Two kinds of market at each size:

- ``trace``: job sizes as in the trace, where 1 % of jobs need more than one
  accelerator; offers of 1 to 8 accelerators.
- ``gangsNN``: the multi-accelerator family, where NN % of jobs are gangs of
  2, 4, 8 or (a few) 16 accelerators on one offer, and offers keep up to 16
  accelerators (``build_market(multi_share=...)``). This is the hard case: a
  round is a multiple-knapsack problem.

``--fractions`` instead runs the fractional-GPU markets of
``benchmarks/fractions.py`` (jobs sized as the trace's ``gpu_milli``): jobs
placed and capacity stranded by the solver, by whole-GPU allocation and by
first-fit into fixed MIG layouts, at 400 and 800 jobs on 100 GPUs.

Each market runs in its own process so that its peak memory is its own.
Printed per market: feasible pairs, objective, the bound the solver proves
(the LP bound when the LP was solved to the end), the gap to it, the
first-come-first-served baseline and the ratio to it, jobs matched, the
seconds at which the answer first came within 2 % and within 1 % of the
bound, total solve seconds and peak memory (the process's maximum resident set).
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
MARKETS: dict[str, float | None] = {
    "trace": None,
    "gangs1": 0.01,
    "gangs15": 0.15,
    "gangs30": 0.30,
}


def run_one(n_jobs: int, n_offers: int, kind: str, seed: int, time_limit: float) -> dict[str, Any]:
    from solver import first_come_first_served, solve

    market = build_market(n_jobs, n_offers, seed=seed, multi_share=MARKETS[kind])
    baseline = first_come_first_served(market)
    started = time.perf_counter()
    result = solve(market, time_limit=time_limit)
    wall = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "size": f"{n_jobs}x{n_offers}",
        "market": kind,
        "seed": seed,
        "gang_share": sum(j.accelerators > 1 for j in market.jobs) / max(1, len(market.jobs)),
        "feasible_pairs": int(result.stats.get("feasible_pairs", 0)),
        "status": result.status,
        "objective": result.objective,
        "bound": result.bound,
        "gap": result.gap,
        "baseline": baseline.objective,
        "ratio": result.objective / baseline.objective if baseline.objective else None,
        "matched": len(result.assignments),
        "baseline_matched": len(baseline.assignments),
        "within_2pct_s": result.stats.get("within_2pct_at"),
        "within_1pct_s": result.stats.get("within_1pct_at"),
        "solve_seconds": wall,
        "peak_mib": peak_mib,
        "time_limit": time_limit,
        "stats": result.stats,
    }


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


HEAD = (
    f"{'size':>11} {'market':>8} {'pairs':>11} {'objective':>13} {'bound':>13} {'gap':>7} "
    f"{'ratio':>6} {'matched':>11} {'2% at':>6} {'1% at':>6} {'seconds':>8} {'peak MiB':>9}"
)


def _line(r: dict[str, Any]) -> str:
    return (
        f"{r['size']:>11} {r['market']:>8} {r['feasible_pairs']:>11,} "
        f"{r['objective']:>13,.0f} {r['bound']:>13,.0f} {100 * r['gap']:>6.2f}% "
        f"{r['ratio']:>6.3f} {r['matched']:>5}/{r['baseline_matched']:<5} "
        f"{_seconds(r['within_2pct_s']):>6} {_seconds(r['within_1pct_s']):>6} "
        f"{r['solve_seconds']:>8.1f} {r['peak_mib']:>9,.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="JOBSxOFFERS")
    parser.add_argument("--markets", nargs="+", default=list(MARKETS), choices=list(MARKETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=None, help="default: per size")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead")
    parser.add_argument("--fractions", action="store_true", help="fractional-GPU markets")
    parser.add_argument(
        "--slice-idle-weight",
        type=float,
        default=None,
        help="with --fractions: the solver's slice_idle_weight (default: the market's)",
    )
    args = parser.parse_args()

    if args.fractions:
        from benchmarks import fractions

        print(fractions.HEAD)
        for n_jobs in (400, 800):
            row = fractions.run(
                n_jobs, 100, args.seed, args.time_limit or 10.0, args.slice_idle_weight
            )
            print("\n".join(fractions.lines(row)), flush=True)
        return

    if args.one:
        size, kind = args.one.split(":")
        n, m = (int(x) for x in size.split("x"))
        limit = args.time_limit or TIME_LIMITS.get(size, 10.0)
        print(json.dumps(run_one(n, m, kind, args.seed, limit)))
        return

    rows = []
    for size in args.sizes:
        for kind in args.markets:
            command = [sys.executable, "-m", "benchmarks.solver", "--one", f"{size}:{kind}"]
            command += ["--seed", str(args.seed)]
            if args.time_limit:
                command += ["--time-limit", str(args.time_limit)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)  # noqa: S603
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            if not args.json:
                if len(rows) == 1:
                    print(HEAD)
                print(_line(row), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(
            "(ratio: objective / first-come-first-served; matched: jobs placed by the solver / "
            "by the baseline; 2% at, 1% at: seconds until the answer was that close to the bound)"
        )


if __name__ == "__main__":
    main()
