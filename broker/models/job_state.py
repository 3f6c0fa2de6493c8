"""The job state machine. Every change of a job's state goes through ``transition``.

::

    open ──► matched ──► running ──► succeeded
      │         │  │        │  │
      │         │  └► open  │  └──► failed
      │         │   (released: offer withdrawn, agent lost)
      │         ├──► failed │
      ▼         ▼           ▼
    cancelled ◄─┴───────────┘        running ──► open (interrupted; resumes from
                                                       its last checkpoint)

- ``open``: waiting in the order book for a clearing round.
- ``matched``: a round assigned it to an offer; the provider has not started it.
- ``running``: the provider's agent is running it.
- ``succeeded`` / ``failed`` / ``cancelled``: final; nothing moves a job out of them.
"""

from __future__ import annotations

import enum

from broker.errors import Conflict


class JobState(enum.StrEnum):
    open = "open"
    matched = "matched"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.open: frozenset({JobState.matched, JobState.cancelled}),
    JobState.matched: frozenset(
        {JobState.running, JobState.open, JobState.failed, JobState.cancelled}
    ),
    JobState.running: frozenset(
        {JobState.succeeded, JobState.failed, JobState.cancelled, JobState.open}
    ),
    JobState.succeeded: frozenset(),
    JobState.failed: frozenset(),
    JobState.cancelled: frozenset(),
}

FINAL_STATES = frozenset(s for s, nexts in TRANSITIONS.items() if not nexts)


class InvalidTransition(Conflict):
    code = "invalid_transition"


def check_transition(current: JobState, new: JobState) -> None:
    """Raise InvalidTransition unless the state machine allows ``current -> new``."""
    if new not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "nothing (it is final)"
        raise InvalidTransition(
            f"{'an' if current.value[0] in 'aeiou' else 'a'} {current.value} job cannot "
            f"become {new.value}; from {current.value} it may "
            f"become {allowed}",
            field="state",
        )
