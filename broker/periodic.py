"""The broker's periodic tasks, registered with the one scheduler (``broker.scheduler``).

- ``clearing``: an automatic clearing round every BROKER_CLEAR_INTERVAL_SECONDS
  (the round itself takes the clearing lease and fences its commit by it); first,
  services are scaled and their replicas placed (``broker.services``).
- ``sweep``: nodes whose heartbeats stopped go offline and their jobs back to the
  market; then runs that never started or ran past their time are ended.
- ``billing``: invoices for ended periods, Stripe sync, webhook retries; and
  uploads no job uses deleted once their grace period is over.

Each runs once per database at a time (its lease), in whichever process of
whichever replica holds it. ``broker serve`` runs them in a process of its own
(``main``), beside the web workers; an app served otherwise (tests, ``uvicorn
broker.app:app``) runs them in threads of its own (``broker.app``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from datetime import timedelta

from broker.billing import sync
from broker.config import Settings, get_settings
from broker.db import get_engine, session_scope
from broker.market.clearing import RoundInProgress, Solve, round_lease_seconds, run_round
from broker.market.standing import Standing
from broker.market.timeouts import SweepReport, sweep_runs
from broker.nodes.service import sweep
from broker.nodes.sweeper import Sweeper
from broker.scheduler import Scheduler, Task
from broker.services import scaling
from broker.services import service as services

log = logging.getLogger(__name__)


class Clearing:
    """Automatic rounds; ``standing`` is what this process's earlier rounds remember."""

    def __init__(self, solver: Solve | None = None) -> None:
        self.solver = solver
        self.standing = Standing()

    def __call__(self) -> None:
        prepare_services()
        # RoundInProgress: a manual round is running; it covers this tick.
        with contextlib.suppress(RoundInProgress):
            run_round(get_engine(), get_settings(), "auto", self.solver, self.standing)


_PRUNE_EVERY_S = 3600.0
_pruned_at = 0.0


def prepare_services() -> None:
    """Before a round: each service's replica count from its load (``scaling``), then
    its replicas opened, let go and pinned where its placement puts them. A failure
    here is logged and the round goes on: jobs need not wait for services."""
    global _pruned_at
    settings = get_settings()
    try:
        with session_scope() as session:
            scaling.autoscale(session, settings)
            services.reconcile(session, settings)
            if time.monotonic() - _pruned_at > _PRUNE_EVERY_S:
                _pruned_at = time.monotonic()
                scaling.prune(session)
    except Exception:
        log.exception("services could not be prepared for the round")


class NodeSweep:
    """Node and run sweeps. Node sweeps wait one node timeout after this process
    starts, pause while the database is unreachable and wait one full timeout after it
    answers again (``broker.nodes.sweeper``), so agents that kept running get to
    report in first; and a tick that comes late (this process was starved) is skipped,
    since the heartbeats it would judge may be waiting behind it."""

    def __init__(self, settings: Settings) -> None:
        self.timeout = settings.node_timeout_s
        self.interval = sweep_interval(settings)
        self.sweeper = Sweeper(self.timeout)
        self._last = time.monotonic()

    def __call__(self) -> None:
        now = time.monotonic()
        gap = now - self._last
        self._last = now
        if gap > self.interval * 2.5:
            # Ticks were missed: the database was unreachable (the lease could not be
            # renewed), or this process just became the sweep's leader. Heartbeats of
            # that time may not have arrived: every node gets a full timeout first.
            self.sweeper.resume_at = max(self.sweeper.resume_at, now + self.timeout)
            return
        if gap > self.interval * 1.2 + self.timeout / 4:
            return  # a late tick (this process was starved)
        swept = self.sweeper.tick(_probe_database, _sweep_nodes)
        if swept:
            log.warning("%d node(s) went offline; their jobs went back to the market", swept)
        if swept is not None and (report := _sweep_runs()):
            log.warning("runs swept: %s", report)


def sweep_interval(settings: Settings) -> float:
    return min(5.0, settings.node_timeout_s / 4)


def _probe_database() -> None:
    from sqlalchemy import text

    with session_scope(write=False) as session:
        session.execute(text("SELECT 1"))


def _sweep_nodes() -> int:
    settings = get_settings()
    with session_scope() as session:
        return sweep(session, settings.node_timeout_s, settings.max_attempts)


def _sweep_runs() -> SweepReport:
    settings = get_settings()
    with session_scope() as session:
        return sweep_runs(
            session,
            start_timeout_s=settings.start_timeout_s,
            max_unstarted=settings.max_unstarted,
            margin_s=settings.run_margin_s,
            max_attempts=settings.max_attempts,
        )


def bill() -> None:
    """Uploads no job uses deleted, then a billing pass (each step idempotent)."""
    from broker.blobs.service import collect_garbage, get_store

    grace = timedelta(hours=get_settings().blob_grace_hours)
    transactions = lambda write=True: session_scope(write=write)  # noqa: E731
    try:
        if deleted := collect_garbage(transactions, get_store(), grace):
            log.info("deleted %d upload(s) no job uses", len(deleted))
    except Exception:
        log.exception("deleting unused uploads failed")
    report = sync.generate(transactions, get_settings())
    if report.invoices or report.sync_errors:
        log.info(
            "billing pass: %d invoice(s), %d synced to Stripe, %d sync error(s)",
            len(report.invoices),
            len(report.synced),
            len(report.sync_errors),
        )


def tasks(
    settings: Settings, *, clearing: bool = True, billing: bool = True, solver: Solve | None = None
) -> list[Task]:
    """The broker's periodic tasks as ``settings`` configure them (an interval of 0
    leaves a task out; ``clearing``/``billing`` False leave them out too)."""
    registered = [Task("sweep", sweep_interval(settings), NodeSweep(settings), first_delay=0.5)]
    if billing and settings.billing_interval_seconds > 0:
        registered.append(Task("billing", settings.billing_interval_seconds, bill, first_delay=1.0))
    if clearing and settings.clear_interval_seconds > 0:
        registered.append(
            Task(
                "clearing",
                settings.clear_interval_seconds,
                Clearing(solver),
                # The task's leader holds on through a long round; the round has its own.
                lease_seconds=round_lease_seconds(settings),
            )
        )
    return registered


def scheduler(settings: Settings, **options: object) -> Scheduler:
    return Scheduler(
        get_engine,
        tasks(settings, **options),  # type: ignore[arg-type]
        lease_seconds=settings.lease_seconds,
    )


def main() -> None:
    """``broker serve``'s scheduler process: every periodic task until SIGTERM or SIGINT,
    which let a round in progress finish. A round is seconds of solver CPU, which in a
    web worker would hold up that worker's requests: here the solve runs in a child
    process at a lower priority (``BackgroundSolver``). On PostgreSQL the whole process
    runs at a somewhat lower priority too: its reads hold no locks that requests wait
    for (MVCC), and its writes lock only the rows it matches. On SQLite it runs at
    normal priority, so a round never holds the database's one write lock while
    starved (that would stop every submission)."""
    import signal

    import broker.models  # noqa: F401 - every table, so the ORM can resolve foreign keys
    from broker.market.clearing import ROUND_NICENESS, BackgroundSolver

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if get_engine().dialect.name == "postgresql":
        os.nice(ROUND_NICENESS)
    solver = BackgroundSolver()
    try:
        scheduler(get_settings(), solver=solver).run_until(stop)
    finally:
        solver.close()
