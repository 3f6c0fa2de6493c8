"""The provider's client: register a node, fetch the work the market matched to it
and run it.

``run_allocation`` is one job's whole life on a provider's machine: start it,
download its artifact, inputs and latest checkpoint, run it in a sandboxed
child process (``broker.sandbox``), upload checkpoints as it goes and the
result at the end, and report the accelerator-seconds it used. The provider agent
(``broker.agent``) calls it for each allocation it picks up.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from broker.portable import _xla, arrays
from broker.portable.artifact import Artifact
from broker.sdk.http import BrokerError, BrokerUnavailable, Connection
from broker.sdk.runlog import RunLog

if TYPE_CHECKING:
    from broker.sandbox import Outcome, Placement, Sandbox

log = logging.getLogger(__name__)


@dataclass
class RunHandle:
    """One allocation running here: how long it has held its accelerators, and a switch
    to stop it between steps (the agent stopping, or the broker saying it ended)."""

    allocation_id: str
    accelerators: float  # held: a share of one for a fractional run
    started: float | None = None  # time.monotonic() when the broker confirmed the start
    ended: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    # The energy the run used, measured (kWh, its devices), asked once it ended; None
    # or a None answer: not measured, the broker bills the estimate.
    energy: Callable[[], float | None] | None = None

    def accelerator_seconds(self) -> float:
        """Usage so far: wall time since the start, times the accelerators held."""
        if self.started is None:
            return 0.0
        end = self.ended if self.ended is not None else time.monotonic()
        return (end - self.started) * self.accelerators


def held_accelerators(order: dict[str, Any]) -> float:
    """What an allocation holds, in accelerators: a share of one for fractions."""
    return float(order["accelerators"]) * float(order.get("share") or 1.0)


class FinishUnreported(BrokerError):
    """A run ended, but the broker could not be told (unreachable, or 5xx after the
    client's retries): ``report`` is the finish to send again (``ProviderClient.finish``
    keyword arguments), so that finished work is not lost to an outage."""

    def __init__(self, allocation_id: str, report: dict[str, Any], cause: BrokerError) -> None:
        super().__init__(cause.status, cause.code, cause.message, cause.field)
        self.allocation_id, self.report = allocation_id, report


class ProviderClient(Connection):
    """A provider's connection to a broker: the provider's API key, or a node key for
    the agent of one node (what ``register`` returns)."""

    def register(self, node: dict[str, Any]) -> dict[str, Any]:
        """Sign a node on (``NodeRegister`` fields); the answer holds its node key."""
        result: dict[str, Any] = self.http.json("POST", "/v1/nodes", json=node)
        return result

    def heartbeat(
        self,
        node_id: str,
        usage: dict[str, float],
        devices: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "usage": [{"allocation_id": a, "accelerator_seconds": s} for a, s in usage.items()]
        }
        if devices is not None:
            body["devices"] = devices
        result: dict[str, Any] = self.http.json("POST", f"/v1/nodes/{node_id}/heartbeat", json=body)
        return result

    def publish(self, node_id: str, offers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Make the node's offers these (``NodeOffer`` fields); the rest are withdrawn."""
        result: dict[str, Any] = self.http.json(
            "PUT", f"/v1/nodes/{node_id}/offers", json={"offers": offers}
        )
        return list(result["offers"])

    def sign_off(self, node_id: str) -> dict[str, Any]:
        """Withdraw the node's offers and hand its jobs back to the market."""
        result: dict[str, Any] = self.http.json("DELETE", f"/v1/nodes/{node_id}")
        return result

    def work(self, wait: float = 0) -> list[dict[str, Any]]:
        """Active allocations on my offers; with ``wait``, long-poll for up to that long."""
        result: list[dict[str, Any]] = self.http.json(
            "GET", "/v1/allocations", params={"wait": wait}, timeout=wait + 30
        )
        return result

    def start(self, allocation_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.http.json("POST", f"/v1/allocations/{allocation_id}/start")
        return result

    def progress(
        self,
        allocation_id: str,
        steps_done: int,
        accelerator_seconds: float | None = None,
        log: list[dict[str, Any]] | None = None,
    ) -> None:
        body = {
            "steps_done": steps_done,
            "accelerator_seconds": accelerator_seconds,
            "log": log or [],
        }
        self.http.request("POST", f"/v1/allocations/{allocation_id}/progress", json=body)

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
        *,
        retry: bool = False,
        accelerator_seconds: float | None = None,
        log: list[dict[str, Any]] | None = None,
        energy_kwh: float | None = None,
    ) -> dict[str, Any]:
        body = {
            "outcome": outcome,
            "result": result,
            "error": error,
            "retry": retry,
            "accelerator_seconds": accelerator_seconds,
            "log": log or [],
        }
        if energy_kwh is not None:
            body["energy_kwh"] = energy_kwh
        data: dict[str, Any] = self.http.json(
            "POST", f"/v1/allocations/{allocation_id}/finish", json=body
        )
        return data

    def download_artifact(self, sha256: str) -> bytes:
        """An artifact file's bytes, checked against their address (not yet verified)."""
        return self.http.download(f"/v1/artifacts/{sha256}/content", sha256)

    def download_arrays(self, sha256: str) -> bytes:
        return self.http.download(f"/v1/arrays/{sha256}/content", sha256)

    def artifact(self, sha256: str) -> Artifact:
        return Artifact.from_bytes(self.http.download(f"/v1/artifacts/{sha256}/content", sha256))

    def arrays(self, sha256: str) -> list[np.ndarray[Any, Any]]:
        return arrays.decode(self.http.download(f"/v1/arrays/{sha256}/content", sha256))


def report_end(
    client: ProviderClient,
    allocation: str,
    handle: RunHandle,
    run_log: RunLog,
    outcome: str,
    what: str,
    **report: Any,
) -> dict[str, Any] | None:
    """Tell the broker how a run (or a replica: ``what`` names it in the log) ended,
    with its usage, measured energy and the last of its log; returns the job as the
    broker answers, None when the allocation had ended meanwhile. A broker that
    cannot take it (unreachable, 5xx) raises FinishUnreported, which carries it."""
    handle.ended = time.monotonic()
    kwh = handle.energy() if handle.energy is not None else None
    if kwh is not None:
        report["energy_kwh"] = kwh
        run_log.write(f"the devices used {kwh * 1000:.3f} Wh (measured)")
    error = report.get("error")
    run_log.write(f"{what} {outcome}" + (f": {error}" if error else ""))
    report = {
        "outcome": outcome,
        "accelerator_seconds": handle.accelerator_seconds(),
        "log": run_log.last(),
        **report,
    }
    try:
        return client.finish(allocation, **report)
    except BrokerError as e:
        if e.code == "allocation_ended":
            return None
        if isinstance(e, BrokerUnavailable) or e.status >= 500:
            raise FinishUnreported(allocation, report, e) from e
        raise


def run_allocation(
    client: ProviderClient,
    order: dict[str, Any],
    *,
    cache_dir: Path | None = None,
    progress_seconds: float = 1.0,
    handle: RunHandle | None = None,
    emulate: bool = False,
    sandbox: Sandbox | None = None,
    placement: Placement | str | None = None,
) -> str:
    """Run one allocation to its end and report it; returns how it ended: the job's
    final state (succeeded, failed), ``requeued`` (a failure another machine may not
    repeat, handed back to the market), ``ended`` (the broker ended the allocation
    meanwhile: the developer cancelled, or the node was declared lost) or
    ``stopped`` (``handle.stop`` was set; the job resumes from its last checkpoint
    when the market hands it out again). A run that reaches the allocation's
    ``usage_limit_seconds`` (the job's budget) stops there and reports it; the
    broker then ends the job as failed, over budget.

    The program runs in a child process of ``sandbox`` (``broker.sandbox``;
    a one-off sandbox when none is given), never in this one, under limits from
    the allocation; the child checks the artifact again before it runs it. It is
    killed within about a progress report of the job being cancelled, its budget
    reached, ``handle.stop`` set, or its wall-time limit (the job's deadline, the
    offer's available hours) passed. A crash, an abort or a limit in the child
    fails the job with the cause: the program's failure, not the machine's.

    ``emulate`` (an agent started with ``--emulate``, for demos) runs the jobs of
    emulated offers, which name another platform, on this machine's backend, from
    the artifact's version for it, and logs that it does. Progress and
    checkpoint reports the broker cannot take (unreachable, or 5xx, after the
    client's retries) are skipped and the run goes on; a finish it cannot take
    raises FinishUnreported, which carries the finish to send again.
    """
    from broker.sandbox import Sandbox, limits_for, read_output, remove

    allocation = order["allocation_id"]
    handle = handle or RunHandle(allocation, held_accelerators(order))
    order = client.start(allocation)
    if handle.started is None:
        handle.started = time.monotonic()
    ended = False
    run_log = RunLog()
    limit = order.get("usage_limit_seconds")

    def over_budget() -> bool:
        return limit is not None and handle.accelerator_seconds() >= limit

    def finish(outcome: str, **report: Any) -> str:
        job = report_end(client, allocation, handle, run_log, outcome, "the run", **report)
        if job is None:
            return "ended"
        requeued = outcome == "failed" and job["state"] == "open"
        return "requeued" if requeued else str(job["state"])

    if order["artifact"] is None:
        return finish("failed", error=f"allocation {allocation} has no program to run")
    here = _xla.local_platform()
    if order["platform"] != here and emulate and order.get("emulated"):
        run_log.write(f"the offer emulates {order['platform']}: the run uses this machine's {here}")
        log.warning(
            "allocation %s: the offer emulates %s; running job %s on this machine's %s",
            allocation,
            order["platform"],
            order["job_id"],
            here,
        )
    elif order["platform"] != here:
        # Never run (and bill) a job as an offer's platform on another backend.
        error = f"the offer is {order['platform']} but this machine runs jobs on {here}"
        return finish("failed", error=error, retry=True)
    if isinstance(placement, str):  # the slice it holds is not on this machine
        return finish("failed", error=placement, retry=True)
    if placement is not None and placement.what:
        run_log.write(f"runs on {order.get('slice') or 'its share'}: {placement.what}")

    steps_done = 0
    last_report = -float("inf")  # the first report goes at once: usage counts from the start

    def report_progress() -> None:
        # Reported on a clock, not only when steps end, so that a single-call job
        # learns as soon as an iterative one that it was cancelled.
        nonlocal last_report, ended
        now = time.monotonic()
        if not ended and now - last_report >= progress_seconds:
            last_report = now
            used = handle.accelerator_seconds()
            lines = run_log.pending()

            def send() -> None:
                client.progress(allocation, steps_done, used, log=lines)
                run_log.sent(lines)

            ended = _ended(send)

    def on_progress(step: int) -> None:
        nonlocal steps_done
        steps_done = step

    def on_checkpoint(step: int, path: Path) -> None:
        nonlocal ended
        try:
            state = arrays.decode(read_output(path, box.config.max_output_bytes + 1024 * 1024))
        except (OSError, arrays.BundleError) as e:
            log.warning("allocation %s: checkpoint at step %d unreadable: %s", allocation, step, e)
            return
        finally:
            path.unlink(missing_ok=True)
        ended = ended or _ended(lambda: client.checkpoint(allocation, state, step))
        run_log.write(f"checkpoint at step {step} saved")

    own = sandbox is None
    box = sandbox if sandbox is not None else Sandbox(cache_dir=cache_dir, spare=False)
    workdir = Path(tempfile.mkdtemp(prefix=f"broker-run-{allocation}-"))
    try:
        began = time.monotonic()
        program = client.download_artifact(order["artifact"])
        (workdir / "artifact.bin").write_bytes(program)
        inputs = client.download_arrays(order["inputs"])
        (workdir / "inputs.bin").write_bytes(inputs)
        run_log.write(
            f"fetched the program ({_kib(program)}) and its inputs ({_kib(inputs)}) "
            f"in {time.monotonic() - began:.2f} s"
        )
        if order["checkpoint"]:
            data = client.download_arrays(order["checkpoint"])
            (workdir / "checkpoint.bin").write_bytes(data)
            run_log.write(f"resuming from the checkpoint at step {order['checkpoint_step']}")
            log.info(
                "allocation %s resumes job %s from its checkpoint at step %d",
                allocation,
                order["job_id"],
                order["checkpoint_step"],
            )
        cache = box.cache_for(order["artifact"])
        spec = {
            "platform": here,
            "steps": order["steps"],
            "checkpoint_every": order["checkpoint_every"],
            "checkpoint_step": order["checkpoint_step"] if order["checkpoint"] else 0,
            "cache_dir": None if cache is None else str(cache),
        }
        outcome = box.run(
            spec,
            workdir,
            limits_for(order, box.config, here),
            should_stop=lambda: ended or handle.stop.is_set() or over_budget(),
            on_progress=on_progress,
            on_checkpoint=on_checkpoint,
            on_tick=report_progress,
            placement=placement,
        )
        _record(run_log, outcome, here)
        if outcome.kind == "stopped":
            # Over budget, the run ends as a failure whichever noticed first: this agent,
            # or the broker from the last progress report (then the report is a repeat).
            if over_budget():
                log.info("allocation %s used the job's budget; stopping it", allocation)
                return finish("failed", error="the run used up the job's budget")
            handle.ended = time.monotonic()
            log.info("allocation %s stopped before its end", allocation)
            return "ended" if ended else "stopped"
        if outcome.kind == "refused":
            log.warning(
                "allocation %s: refused to run the artifact: %s", allocation, outcome.message
            )
            return finish("failed", error=f"the agent refused the artifact: {outcome.message}")
        if outcome.kind == "failed":
            log.warning("allocation %s: %s", allocation, outcome.message)
            return finish("failed", error=outcome.message, retry=outcome.retry)
        assert outcome.result is not None
        data = read_output(outcome.result, box.config.max_output_bytes + 1024 * 1024)
        result = client.upload_bundle(data)
        run_log.write(f"uploaded the result ({_kib(data)})")
        return finish("succeeded", result=result)
    finally:
        remove(workdir)
        if own:
            box.close()


def _kib(data: bytes) -> str:
    return f"{len(data) / 1024:,.1f} KiB"


def _record(run_log: RunLog, outcome: Outcome, platform: str) -> None:
    """What the sandboxed child said of its run, in the run's log."""
    if outcome.compile_seconds is not None:
        run_log.write(f"compiled for {platform} in {outcome.compile_seconds:.3f} s")
    if outcome.run_seconds is not None:
        steps = f"{outcome.steps_done} steps" if outcome.steps_done != 1 else "1 step"
        run_log.write(f"ran {steps} in {outcome.run_seconds:.3f} s")
    if outcome.kind == "stopped":
        run_log.write("stopped before its end")
    run_log.write(outcome.stderr, stream="program")


def _ended(report: Any) -> bool:
    """Send a report; True if the broker says the allocation has ended.

    A report that still fails after the client's retries because the broker is
    unavailable (unreachable, or 5xx: its database may be down) is skipped: the
    run goes on, and the next report, or the finish, tells the broker.
    """
    try:
        report()
    except BrokerError as e:
        if e.code == "allocation_ended":
            return True
        if isinstance(e, BrokerUnavailable) or e.status >= 500:
            log.warning("a report failed, the run goes on: %s", e)
            return False
        raise
    return False


# The name from before matched work had one name (allocation); providers' scripts use it.
run_work_order = run_allocation
