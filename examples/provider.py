"""A provider's agent: offer this machine's CPU at a price and run the jobs the
market matches to it, until Ctrl-C (or for --seconds).

    BROKER_URL=http://127.0.0.1:8000 BROKER_API_KEY=bk_... python examples/provider.py --price 0.08

The key is a provider's (`broker accounts create NAME --role provider`). This is
what `broker agent --adapter cpu --price cpu=0.08 ...` does, written out with the
SDK's agent so it can be adapted: prices per catalog model, location, slots.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from decimal import Decimal

from adapters import registry
from broker.agent import AgentConfig, NodeAgent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--price", default="0.08", help="USD per CPU slot-hour")
    parser.add_argument("--slots", type=int, default=1, help="jobs run at once")
    parser.add_argument("--name", default="example-provider")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    agent = NodeAgent(
        AgentConfig(
            broker=os.environ.get("BROKER_URL", "http://127.0.0.1:8000"),
            api_key=os.environ["BROKER_API_KEY"],
            name=args.name,
            region="europe-west4",
            country="NL",
            lat=53.44,
            lon=6.84,
            prices={"cpu": Decimal(args.price)},
            adapter="cpu",
            options=registry.Options(cpu_slots=args.slots),
            poll_seconds=1.0,
        )
    )
    stop = threading.Event()
    if args.seconds is not None:
        threading.Timer(args.seconds, stop.set).start()
    try:
        agent.run(stop)  # registers, publishes the offer, runs work; signs off on stop
    except KeyboardInterrupt:
        stop.set()


if __name__ == "__main__":
    main()
