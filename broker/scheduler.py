"""The one scheduler: every periodic task of the broker is registered here.

A ``Task`` is a function run every ``interval`` seconds, give or take ``jitter``
(a fraction of the interval, so that replicas started together do not tick
together). A task marked ``once_per_database`` (all of the broker's are) runs in
one process at a time per database, whatever the number of processes and
replicas: before each run the process takes or renews the task's lease
(``broker.leases``), and a process that does not hold it skips the run. A holder
that dies stops renewing; another process takes over once the lease expires
(``lease_seconds``, at least three intervals). The lease decides who *runs* a task;
work that must never be done by two holders at once (a clearing round's commit)
is fenced by a lease of its own (``broker.market.clearing``).

Each task runs in a thread of its own, so a long clearing round does not hold up
the node sweep. ``Scheduler.start`` runs them in the background (the embedded
server's lifespan); ``run_until`` is a process's main loop (``broker serve``'s
scheduler process). A stop lets a run in progress finish.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine

from broker import leases

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    name: str
    interval: float
    run: Callable[[], object]
    jitter: float = 0.1  # each wait is interval * (1 +- jitter)
    first_delay: float | None = None  # before the first run; default one interval
    once_per_database: bool = True
    lease_seconds: float = 0.0  # default: three intervals, and at least the scheduler's

    def lease_for(self, minimum: float) -> float:
        return max(self.lease_seconds, 3 * self.interval, minimum)


class Scheduler:
    """Runs ``tasks`` against the database ``engine()`` returns, as ``holder``."""

    def __init__(
        self,
        engine: Callable[[], Engine],
        tasks: Sequence[Task],
        *,
        lease_seconds: float = 30.0,
        holder: str | None = None,
    ) -> None:
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique: {names}")
        self.engine = engine
        self.tasks = list(tasks)
        self.lease_seconds = lease_seconds
        self.holder = holder or leases.holder_id()
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.runs: dict[str, int] = {t.name: 0 for t in tasks}  # runs this process made

    def tick(self, task: Task) -> bool:
        """Run ``task`` once if this process holds (or now takes) its lease; returns
        whether it ran. A failure is logged, never raised: the next tick tries again."""
        try:
            if task.once_per_database:
                seconds = task.lease_for(self.lease_seconds)
                if leases.acquire(self.engine(), f"task:{task.name}", self.holder, seconds) is None:
                    return False
            task.run()
        except Exception:
            log.exception("periodic task %s failed", task.name)
            return False
        self.runs[task.name] += 1
        return True

    def _loop(self, task: Task) -> None:
        delay = task.interval if task.first_delay is None else task.first_delay
        while not self.stopping.wait(_jittered(delay, task.jitter)):
            self.tick(task)
            delay = task.interval

    def start(self) -> None:
        """Run every task in a daemon thread of its own until ``stop``."""
        for task in self.tasks:
            thread = threading.Thread(target=self._loop, args=(task,), name=f"task:{task.name}")
            thread.daemon = True
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Start no more runs; wait up to ``timeout`` seconds for those in progress, then
        give this process's leases up so that another takes over at once."""
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = [t for t in self._threads if t.is_alive()]
        for task in self.tasks:
            if task.once_per_database and not any(
                t.name == f"task:{task.name}" for t in self._threads
            ):
                self._give_up(task)

    def _give_up(self, task: Task) -> None:
        name = f"task:{task.name}"
        try:
            token = leases.current(self.engine(), name, self.holder)
            if token is not None:
                leases.release(self.engine(), name, self.holder, token)
        except Exception:
            log.warning("could not give the %s lease up; it expires by itself", name)

    def run_until(self, stop: threading.Event) -> None:
        """A process's main loop: run the tasks until ``stop`` is set."""
        self.start()
        stop.wait()
        self.stop(timeout=60.0)


# A generator of its own: the jitter never draws from (or moves) the global one, which
# other code in the process may seed or replay (Hypothesis checks that strategies
# leave it alone, and a tick landing mid-draw made the schema tests flaky).
_JITTER = random.Random()


def _jittered(seconds: float, jitter: float) -> float:
    return max(0.0, seconds * (1 + _JITTER.uniform(-jitter, jitter)))
