from __future__ import annotations

import itertools

import pytest
from sqlalchemy.orm import Session

from broker.models.account import Role
from broker.models.job_state import (
    FINAL_STATES,
    TRANSITIONS,
    InvalidTransition,
    JobState,
    check_transition,
)
from tests.factories import make_account, make_job

ALLOWED = {
    (JobState.open, JobState.matched),
    (JobState.open, JobState.cancelled),
    (JobState.matched, JobState.running),
    (JobState.matched, JobState.open),
    (JobState.matched, JobState.failed),
    (JobState.matched, JobState.cancelled),
    (JobState.running, JobState.succeeded),
    (JobState.running, JobState.failed),
    (JobState.running, JobState.cancelled),
    (JobState.running, JobState.open),
}


@pytest.mark.parametrize(("current", "new"), list(itertools.product(JobState, JobState)))
def test_only_documented_transitions_are_allowed(current: JobState, new: JobState) -> None:
    if (current, new) in ALLOWED:
        check_transition(current, new)
    else:
        with pytest.raises(InvalidTransition):
            check_transition(current, new)


def test_final_states_are_final() -> None:
    assert {JobState.succeeded, JobState.failed, JobState.cancelled} == FINAL_STATES
    assert all(not TRANSITIONS[s] for s in FINAL_STATES)


def test_move_to_walks_the_machine_and_stamps_the_finish(db: Session) -> None:
    developer, _ = make_account(db, Role.developer)
    job = make_job(db, developer)
    assert job.state == JobState.open
    assert job.finished_at is None
    for state in (
        JobState.matched,
        JobState.running,
        JobState.open,
        JobState.matched,
        JobState.running,
        JobState.succeeded,
    ):
        job.move_to(state)
    assert job.finished_at is not None
    with pytest.raises(InvalidTransition) as excinfo:
        job.move_to(JobState.running)
    assert "final" in excinfo.value.message
