"""Carbon against cost: `python -m benchmarks.carbon`.

Clears the benchmark markets (``benchmarks.markets``: real cloud prices and
regions, whose offers carry their model's datasheet power, their site's PUE
and their grid's carbon intensity from ``adapters/grid.py``) at market-wide
carbon prices of 0, 50, 100, 200 and 500 USD per tonne of CO2e, and prints
for each the cleared round's estimated emissions, its cost (compute, egress
and latency: what is paid, the carbon price left out), jobs matched, the
solver's gap, and against the round at price 0 the share of emissions
avoided for each percent of extra cost.

    python -m benchmarks.carbon
    python -m benchmarks.carbon --sizes 2000x500 --markets trace gangs15
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from benchmarks.markets import build_market
from benchmarks.solver import MARKETS, TIME_LIMITS
from solver import Weights, solve

PRICES = (0.0, 50.0, 100.0, 200.0, 500.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["2000x500"], help="JOBSxOFFERS")
    parser.add_argument("--markets", nargs="+", default=["trace", "gangs15"], choices=list(MARKETS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        f"{'size':>10} {'market':>8} {'USD/t':>6} {'t CO2e':>9} {'cost USD':>12} "
        f"{'matched':>8} {'gap':>7} {'seconds':>8} {'avoided':>8} {'extra cost':>10} "
        f"{'avoided per % cost':>18}"
    )
    for size in args.sizes:
        n, m = (int(x) for x in size.split("x"))
        for kind in args.markets:
            market = build_market(n, m, seed=args.seed, multi_share=MARKETS[kind])
            base: tuple[float, float] | None = None
            for price in PRICES:
                priced = replace(market, weights=replace(Weights(), carbon_usd_per_t=price))
                started = time.perf_counter()
                result = solve(priced, time_limit=TIME_LIMITS.get(size, 10.0))
                seconds = time.perf_counter() - started
                tonnes = sum(a.gco2 for a in result.assignments) / 1e6
                paid = sum(a.cost - a.carbon_usd for a in result.assignments)
                if base is None:
                    base = (tonnes, paid)
                avoided = 1 - tonnes / base[0] if base[0] else 0.0
                extra = paid / base[1] - 1 if base[1] else 0.0
                per = f"{avoided / extra:.2f}" if extra > 1e-6 else "-"
                print(
                    f"{size:>10} {kind:>8} {price:>6.0f} {tonnes:>9.2f} {paid:>12,.0f} "
                    f"{len(result.assignments):>8} {100 * (result.gap or 0):>6.2f}% "
                    f"{seconds:>8.1f} {100 * avoided:>7.1f}% {100 * extra:>9.2f}% {per:>18}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
