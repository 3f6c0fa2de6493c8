from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from broker.db import Base, UtcDateTime


class RunLogLine(Base):
    """One line of a run's log, as its agent reported it.

    A run's log is the agent's account of it (fetching the program, start-up,
    checkpoints, how it ended) and what the program's process wrote to its
    standard error (JAX's and XLA's warnings, a crash's last words). Lines are
    numbered by the agent (``seq``, from 0 in each run), so that a report sent
    again adds nothing, and at most ``MAX_LINES`` are kept a run.
    """

    __tablename__ = "run_log_lines"

    allocation_id: Mapped[str] = mapped_column(ForeignKey("allocations.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime)  # when the agent wrote it
    stream: Mapped[str] = mapped_column(String(16))  # agent, or program (its stderr)
    text: Mapped[str] = mapped_column(Text)


MAX_LINES = 1000  # lines kept a run: later ones are dropped (the agent says so in the last)
