"""The provider's client: fetch the work the market matched to my offers and run it.

``run_work_order`` is one job's whole life on a provider's machine: start it,
download its artifact, inputs and latest checkpoint, run it with the
portability runner, upload checkpoints as it goes and the result at the end.
The provider agent calls it for each allocation it picks up.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from broker.portable import arrays, runner
from broker.portable.artifact import Artifact
from broker.portable.manifest import ArtifactError
from broker.sdk.http import BrokerError, Connection

log = logging.getLogger(__name__)


class ProviderClient(Connection):
    """A provider's connection to a broker (an API key of a provider account)."""

    def work(self, wait: float = 0) -> list[dict[str, Any]]:
        """Active allocations on my offers; with ``wait``, long-poll for up to that long."""
        result: list[dict[str, Any]] = self.http.json(
            "GET", "/v1/allocations", params={"wait": wait}, timeout=wait + 30
        )
        return result

    def start(self, allocation_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.http.json("POST", f"/v1/allocations/{allocation_id}/start")
        return result

    def progress(self, allocation_id: str, steps_done: int) -> None:
        self.http.request(
            "POST", f"/v1/allocations/{allocation_id}/progress", json={"steps_done": steps_done}
        )

    def checkpoint(self, allocation_id: str, state: list[np.ndarray[Any, Any]], step: int) -> str:
        sha = self.upload_arrays(state)
        self.http.request(
            "POST",
            f"/v1/allocations/{allocation_id}/checkpoint",
            json={"checkpoint": sha, "step": step},
        )
        return sha

    def finish(
        self,
        allocation_id: str,
        outcome: str,
        result: str | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        body = {"outcome": outcome, "result": result, "error": error}
        data: dict[str, Any] = self.http.json(
            "POST", f"/v1/allocations/{allocation_id}/finish", json=body
        )
        return data

    def artifact(self, sha256: str) -> Artifact:
        return Artifact.from_bytes(self.http.download(f"/v1/artifacts/{sha256}/content", sha256))

    def arrays(self, sha256: str) -> list[np.ndarray[Any, Any]]:
        return arrays.decode(self.http.download(f"/v1/arrays/{sha256}/content", sha256))


def run_work_order(
    client: ProviderClient,
    order: dict[str, Any],
    *,
    cache_dir: Path | None = None,
    progress_seconds: float = 1.0,
) -> str:
    """Run one allocation to its end and report it; returns the job's final state.

    The program failing, or the artifact not fitting this machine, ends the job as
    failed with the reason. The allocation ending meanwhile (the developer
    cancelled) stops the run between steps. The broker being unreachable raises
    BrokerUnavailable after retries, leaving the job for the agent to pick up again.
    """
    allocation = order["allocation_id"]
    order = client.start(allocation)
    if order["artifact"] is None:
        raise ArtifactError(f"allocation {allocation} has no program to run")
    if cache_dir is not None:
        runner.enable_compilation_cache(cache_dir)
    ended = False
    last_report = 0.0

    def on_progress(step: int) -> None:
        nonlocal last_report, ended
        now = time.monotonic()
        if now - last_report >= progress_seconds:
            last_report = now
            ended = ended or _ended(lambda: client.progress(allocation, step))

    def on_checkpoint(step: int, state: list[np.ndarray[Any, Any]]) -> None:
        nonlocal ended
        ended = ended or _ended(lambda: client.checkpoint(allocation, state, step))

    try:
        artifact = client.artifact(order["artifact"])
        inputs = client.arrays(order["inputs"])
        checkpoint = None
        if order["checkpoint"]:
            state = client.arrays(order["checkpoint"])
            checkpoint = runner.Checkpoint(order["checkpoint_step"], state)
        result = runner.run(
            artifact,
            inputs,
            steps=order["steps"],
            checkpoint_every=order["checkpoint_every"],
            checkpoint=checkpoint,
            on_checkpoint=on_checkpoint,
            on_progress=on_progress,
            should_stop=lambda: ended,
        )
    except runner.Stopped:
        log.info("allocation %s ended while it ran; stopped", allocation)
        return "cancelled"
    except (runner.RunError, ArtifactError, arrays.BundleError) as e:
        return str(client.finish(allocation, "failed", error=str(e))["state"])
    except BrokerError:
        raise
    except Exception as e:  # the program itself failed (XLA runtime error, out of memory)
        log.exception("allocation %s: the program failed", allocation)
        message = f"{type(e).__name__}: {e}"[:4000]
        return str(client.finish(allocation, "failed", error=message)["state"])
    sha = client.upload_arrays(result.outputs)
    try:
        return str(client.finish(allocation, "succeeded", result=sha)["state"])
    except BrokerError as e:
        if e.code == "allocation_ended":
            return "cancelled"
        raise


def _ended(report: Any) -> bool:
    """Send a report; True if the broker says the allocation has ended."""
    try:
        report()
    except BrokerError as e:
        if e.code == "allocation_ended":
            return True
        raise
    return False
