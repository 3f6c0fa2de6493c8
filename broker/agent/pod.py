"""The runner in a Kubernetes Job's pod: ``python -m broker.agent.pod``.

The Kubernetes agent (``broker.agent.kube``) starts one Job per allocation; its
container runs this module with the work order and the node's key in its
environment (``broker.agent.kube_jobs.runner_env``). It runs the order as any
agent does (``run_allocation``, or ``serve_allocation`` for a service's replica,
which serves until the broker lets it go: download, run in a sandboxed child, report
progress, checkpoints and the result to the broker) and exits 0 once the
broker has heard how the run ended, or ``EXIT_UNREPORTED`` when it could not
tell it (the agent then hands the job back to the market).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from broker.agent.kube_jobs import EXIT_UNREPORTED
from broker.agent.serving import serve_allocation
from broker.sandbox import Sandbox
from broker.sdk.http import BrokerError
from broker.sdk.provider import ProviderClient, RunHandle, held_accelerators, run_allocation

log = logging.getLogger("broker.agent.pod")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        url = os.environ["BROKER_URL"]
        key = os.environ["BROKER_NODE_KEY"]
        order = json.loads(os.environ["BROKER_WORK_ORDER"])
    except (KeyError, ValueError) as e:
        log.error("the pod's environment lacks a readable %s", e)
        return 2
    emulate = os.environ.get("BROKER_EMULATE") == "1"
    cache = os.environ.get("BROKER_CACHE_DIR")
    with ProviderClient(url, key, retry_seconds=60.0) as client:
        try:
            if order.get("service_id"):  # a replica: it serves until the broker lets it go
                outcome = _serve(client, order, Path(cache) if cache else None, emulate)
            else:
                outcome = run_allocation(
                    client, order, cache_dir=Path(cache) if cache else None, emulate=emulate
                )
        except BrokerError as e:
            log.error(
                "allocation %s: the broker did not hear the end: %s", order["allocation_id"], e
            )
            return EXIT_UNREPORTED
    log.info("allocation %s: %s", order["allocation_id"], outcome)
    return 0


def _serve(client: ProviderClient, order: dict[str, Any], cache: Path | None, emulate: bool) -> str:
    """A service's replica in this pod (``broker.agent.serving``), in a sandbox of its own."""
    sandbox = Sandbox(cache_dir=cache, spare=False)
    try:
        handle = RunHandle(order["allocation_id"], held_accelerators(order))
        return serve_allocation(client, order, handle=handle, sandbox=sandbox, emulate=emulate)
    finally:
        sandbox.close()


if __name__ == "__main__":
    sys.exit(main())
