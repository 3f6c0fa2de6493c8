"""Jobs that ask for part of an accelerator: a fraction in thousandths or a MIG
profile, and whether they accept shared capacity (docs/market.md, fractions)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session

from broker.models.account import Role
from broker.models.job import Job
from tests.conftest import ClientFactory, signed_in
from tests.factories import job_body


@pytest.fixture
def developer(db: Session, client_for: ClientFactory) -> Any:
    return signed_in(db, client_for, Role.developer)


def _refused(developer: Any, field: str, **body: Any) -> str:
    answer = developer.post("/v1/jobs", json=job_body(**body))
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["field"] == field, error
    return str(error["message"])


def test_a_fraction_is_stored_in_thousandths(developer: Any, db: Session) -> None:
    answer = developer.post("/v1/jobs", json=job_body(accelerators=0.47, accepts_shared=True))
    assert answer.status_code == 201, answer.text
    job = answer.json()
    assert (job["accelerators"], job["accepts_shared"], job["mig_profile"]) == (0.47, True, None)
    row = db.get(Job, job["id"])
    assert row is not None
    assert (row.accelerators, row.fraction_milli, row.accepts_shared) == (1, 470, True)
    assert developer.get(f"/v1/jobs/{job['id']}").json()["accelerators"] == 0.47


def test_whole_jobs_stay_whole(developer: Any, db: Session) -> None:
    job = developer.post("/v1/jobs", json=job_body(accelerators=2)).json()
    assert (job["accelerators"], job["accepts_shared"]) == (2, False)
    row = db.get(Job, job["id"])
    assert row is not None
    assert (row.accelerators, row.fraction_milli) == (2, None)


@pytest.mark.parametrize(
    ("accelerators", "words"),
    [(1.5, "a whole number"), (0.0005, "thousandths"), (0.3333, "thousandths")],
)
def test_a_fraction_out_of_range_is_refused(
    developer: Any, accelerators: float, words: str
) -> None:
    assert words in _refused(developer, "body.accelerators", accelerators=accelerators)


def test_zero_and_negative_accelerators_are_refused(developer: Any) -> None:
    for n in (0, -0.5):
        answer = developer.post("/v1/jobs", json=job_body(accelerators=n))
        assert answer.status_code == 422, answer.text


def test_a_mig_profile_of_the_models_is_taken(developer: Any, db: Session) -> None:
    body = job_body(mig_profile="3g.40gb", accelerator_models=["h100-sxm"])
    answer = developer.post("/v1/jobs", json=body)
    assert answer.status_code == 201, answer.text
    assert answer.json()["mig_profile"] == "3g.40gb"
    row = db.get(Job, answer.json()["id"])
    assert row is not None
    assert (row.mig_profile, row.fraction_milli) == ("3g.40gb", None)


def test_a_profile_the_models_lack_is_refused_with_theirs(developer: Any) -> None:
    message = _refused(
        developer, "body.mig_profile", mig_profile="1g.18gb", accelerator_models=["h100-sxm"]
    )
    assert "1g.18gb" in message
    assert "3g.40gb" in message


def test_a_profile_no_model_has_is_refused(developer: Any) -> None:
    assert "5g.99gb" in _refused(developer, "body.mig_profile", mig_profile="5g.99gb")


def test_a_profile_and_a_fraction_together_are_refused(developer: Any) -> None:
    message = _refused(developer, "body.accelerators", mig_profile="3g.40gb", accelerators=0.5)
    assert "not both" in message
