"""The log of one run on a provider's machine, sent to the broker with its reports.

Lines are numbered from 0 as they are written and wait until a report the
broker accepts carries them (a progress report, or the finish); a report that
fails keeps them for the next, and the broker stores each number once, so
sending a line twice is harmless. A run writes at most ``MAX_LINES``: the last
says that later ones were dropped.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

MAX_LINES = 1000  # as the broker keeps (broker.models.run_log.MAX_LINES)
MAX_TEXT = 2000  # characters of one line
BATCH = 200  # lines one report carries


class RunLog:
    """Numbered lines of one run's log, waiting to be sent."""

    def __init__(self, max_lines: int = MAX_LINES) -> None:
        self.max_lines = max_lines
        self._pending: list[dict[str, Any]] = []
        self._next = 0
        self._lock = threading.Lock()

    def write(self, text: str, stream: str = "agent") -> None:
        """Add ``text`` (each of its lines; blank ones skipped) to the log."""
        for part in text.splitlines():
            if part.strip():
                self._add(part.rstrip()[:MAX_TEXT], stream)

    def _add(self, text: str, stream: str) -> None:
        with self._lock:
            if self._next >= self.max_lines:
                return
            if self._next == self.max_lines - 1:
                text, stream = f"later lines dropped: a run keeps {self.max_lines}", "agent"
            at = datetime.now(UTC).isoformat()
            self._pending.append({"seq": self._next, "at": at, "stream": stream, "text": text})
            self._next += 1

    def pending(self) -> list[dict[str, Any]]:
        """The oldest lines not sent yet, as many as one report carries."""
        with self._lock:
            return list(self._pending[:BATCH])

    def last(self) -> list[dict[str, Any]]:
        """The newest lines not sent yet, as many as one report carries: for the
        finish, the last report (older ones a flood left unsent are lost)."""
        with self._lock:
            return list(self._pending[-BATCH:])

    def sent(self, lines: list[dict[str, Any]]) -> None:
        """The broker has ``lines``: stop holding them."""
        done = {line["seq"] for line in lines}
        with self._lock:
            self._pending = [line for line in self._pending if line["seq"] not in done]
