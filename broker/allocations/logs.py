"""A run's log: the lines its agent reports, kept beside the allocation.

The agent numbers the lines of each run from 0 and sends the new ones with its
progress reports and its finish (``broker.sdk.provider``). A line is stored
once, whatever the number of times it is sent (a report retried after a lost
answer), and a run keeps at most ``MAX_LINES``: a program that floods its
stderr cannot fill the database. Developers read the lines of every run of a
job (``GET /v1/jobs/{id}/logs``, ``broker jobs logs``, the job's page).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from broker.models.market import Allocation
from broker.models.run_log import MAX_LINES, RunLogLine


class Line(Protocol):
    @property
    def seq(self) -> int: ...
    @property
    def at(self) -> datetime: ...
    @property
    def stream(self) -> str: ...
    @property
    def text(self) -> str: ...


def append(session: Session, allocation: Allocation, lines: Sequence[Line]) -> int:
    """Store the lines of ``allocation``'s run not stored yet; returns how many."""
    if not lines:
        return 0
    top = session.scalar(
        select(func.max(RunLogLine.seq)).where(RunLogLine.allocation_id == allocation.id)
    )
    seen = -1 if top is None else top
    fresh: dict[int, Line] = {}
    for line in lines:
        if seen < line.seq < MAX_LINES:
            fresh.setdefault(line.seq, line)
    session.add_all(
        RunLogLine(
            allocation_id=allocation.id,
            seq=seq,
            job_id=allocation.job_id,
            at=line.at,
            stream=line.stream,
            text=line.text,
        )
        for seq, line in sorted(fresh.items())
    )
    return len(fresh)


def of_job(session: Session, job_id: str, limit: int = 10 * MAX_LINES) -> list[RunLogLine]:
    """The lines of every run of a job: run by run in the order they were matched,
    each run's in its agent's order."""
    return list(
        session.scalars(
            select(RunLogLine)
            .join(Allocation, Allocation.id == RunLogLine.allocation_id)
            .where(RunLogLine.job_id == job_id)
            .order_by(Allocation.created_at, Allocation.id, RunLogLine.seq)
            .limit(limit)
        )
    )
