"""Deploying a service, and where reconcile puts its replicas (issue 26, placement):
users on two continents get a replica on each when the SLO demands it and one when
it does not; never a replica outside the allowed countries; a region no offer can
serve is explained; fewer wanted, the redundant replica goes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import jax
import numpy as np
import pytest
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from broker.config import get_settings
from broker.db import utcnow
from broker.models.account import Role
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.market import AllocationStatus
from broker.models.offer import Offer
from broker.models.service import Service, ServiceEvent, ServiceWindow
from broker.portable import arrays
from broker.portable.artifact import package, package_step
from broker.services import service as services
from tests.conftest import ClientFactory, signed_in
from tests.factories import make_account, make_offer, make_run

BIN = {"Content-Type": "application/octet-stream"}
AMSTERDAM = {"name": "amsterdam", "lat": 52.37, "lon": 4.9, "share": 2.0}
NEW_YORK = {"name": "new-york", "lat": 40.71, "lon": -74.0, "share": 1.0}
PLACES = {
    "eu": {"region": "europe-west4", "country": "NL", "lat": 53.44, "lon": 6.84},
    "de": {"region": "europe-west3", "country": "DE", "lat": 50.11, "lon": 8.68},
    "us": {"region": "us-east4", "country": "US", "lat": 38.9, "lon": -77.0},
}


def tanh(w: Any, x: Any) -> Any:
    return jax.numpy.tanh(x @ w)


@pytest.fixture
def developer(db: Session, client_for: ClientFactory) -> Any:
    return upload(signed_in(db, client_for, Role.developer))


def upload(client: Any) -> Any:
    """``client`` with a function, its example inputs and a step function uploaded
    (their addresses in ``client.sha``)."""
    w, x = np.ones((3, 2), np.float32), np.ones((1, 3), np.float32)
    uploads = {
        "artifact": ("/v1/artifacts", package(tanh, w, x, platforms=("cpu",)).to_bytes()),
        "inputs": ("/v1/arrays", arrays.encode([w, x])),
        "step": ("/v1/artifacts", package_step(lambda s, a: s + a, w, w).to_bytes()),
        "step_inputs": ("/v1/arrays", arrays.encode([w, w])),
    }
    client.sha = {}
    for name, (path, data) in uploads.items():
        response = client.post(path, content=data, headers=BIN)
        assert response.status_code in (200, 201), response.text
        client.sha[name] = response.json()["sha256"]
    return client


def deploy(developer: Any, **fields: Any) -> dict[str, Any]:
    body = {
        "artifact": developer.sha["artifact"],
        "inputs": developer.sha["inputs"],
        "users": [AMSTERDAM, NEW_YORK],
        "latency_slo_ms": 30,
        "max_price_per_hour": "3.00",
        "max_replicas": 4,
        **fields,
    }
    response = developer.post("/v1/services", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def offers(db: Session, *places: str, price: str = "1.00") -> dict[str, str]:
    provider, _ = make_account(db, Role.provider)
    made = {}
    for place in places:
        offer = make_offer(
            db, provider, accelerator="cpu", count=2, price_per_hour=price, **PLACES[place]
        )
        made[offer.id] = place
    return made


def pinned(db: Session, service_id: str) -> list[str]:
    services.reconcile(db, get_settings())
    jobs = db.scalars(
        select(Job).where(Job.service_id == service_id, Job.state == JobState.open)
    ).all()
    return sorted(j.pinned_offer_id or "" for j in jobs)


def test_two_continents_two_replicas_under_a_tight_slo(db: Session, developer: Any) -> None:
    where = offers(db, "eu", "us")
    service = deploy(developer, latency_slo_ms=30)
    pins = pinned(db, service["id"])
    assert sorted(where[p] for p in pins) == ["eu", "us"]
    assert db.get_one(Service, service["id"]).placement_note is None


def test_one_replica_when_one_is_within_a_loose_slo(db: Session, developer: Any) -> None:
    where = offers(db, "eu", "us")
    service = deploy(developer, latency_slo_ms=200)
    pins = pinned(db, service["id"])
    assert len(pins) == 1
    assert where[pins[0]] in ("eu", "us")


def test_never_outside_the_allowed_countries(db: Session, developer: Any) -> None:
    where = offers(db, "eu", "de", "us")
    service = deploy(developer, allowed_countries=["DE"])
    pins = pinned(db, service["id"])
    assert [where[p] for p in pins] == ["de"]
    note = db.get_one(Service, service["id"]).placement_note
    assert note is not None
    assert note.startswith("new-york: no offer it may use is within 30 ms")
    # The API says why, in the service's own words.
    assert "new-york" in developer.get(f"/v1/services/{service['id']}").json()["unmatched"]


def test_a_service_with_no_offer_explains_and_waits(db: Session, developer: Any) -> None:
    service = deploy(developer, users=[AMSTERDAM])
    assert pinned(db, service["id"]) == []
    note = db.get_one(Service, service["id"]).placement_note or ""
    assert "no offer it may use" in note


def test_an_iterative_program_cannot_be_a_service(developer: Any) -> None:
    body = {
        "artifact": developer.sha["step"],
        "inputs": developer.sha["step_inputs"],
        "users": [AMSTERDAM],
        "latency_slo_ms": 30,
        "max_price_per_hour": "3.00",
    }
    response = developer.post("/v1/services", json=body)
    assert response.status_code == 422
    assert "plain function" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "change",
    [
        {"min_replicas": 3, "max_replicas": 2},
        {"users": []},
        {"latency_slo_ms": 0},
        {"users": [{"lat": 91, "lon": 0}]},
    ],
)
def test_bad_services_are_refused(developer: Any, change: dict[str, Any]) -> None:
    body = {
        "artifact": developer.sha["artifact"],
        "inputs": developer.sha["inputs"],
        "users": [AMSTERDAM],
        "latency_slo_ms": 30,
        "max_price_per_hour": "3.00",
        **change,
    }
    assert developer.post("/v1/services", json=body).status_code == 422


def test_undeploy_lets_every_replica_go(db: Session, developer: Any) -> None:
    offers(db, "eu", "us")
    service = deploy(developer)
    assert len(pinned(db, service["id"])) == 2
    response = developer.delete(f"/v1/services/{service['id']}")
    assert response.status_code == 200
    assert response.json()["state"] == "undeployed"
    states = db.scalars(select(Job.state).where(Job.service_id == service["id"])).all()
    assert set(states) == {JobState.cancelled}
    assert developer.delete(f"/v1/services/{service['id']}").status_code == 200  # harmless
    # Undeployed, it is not placed again.
    assert pinned(db, service["id"]) == []


def test_a_replica_the_relay_stopped_hearing_from_is_replaced(db: Session, developer: Any) -> None:
    where = offers(db, "eu")
    service = deploy(developer, users=[AMSTERDAM], latency_slo_ms=30)
    (pin,) = pinned(db, service["id"])
    job = db.scalars(select(Job).where(Job.service_id == service["id"])).one()
    offer = db.get_one(Offer, pin)
    run = make_run(db, job, offer, 0, ended_at=None, status=AllocationStatus.active)
    offer.count -= 1
    job.move_to(JobState.matched)
    job.move_to(JobState.running)
    run.started_at = utcnow() - timedelta(seconds=get_settings().service_start_grace_s + 60)
    db.add(
        ServiceWindow(
            service_id=service["id"], scope=f"replica:{run.id}", ended_at=utcnow(), seconds=5.0,
            requests=3, errors=0,
        )
    )  # fmt: skip
    db.flush()
    assert pinned(db, service["id"]) == []  # heard from lately: it stays, none opens
    db.execute(delete(ServiceWindow))
    assert pinned(db, service["id"]) == []  # the relay says nothing at all: no judgement
    db.add(
        ServiceWindow(
            service_id=service["id"], scope="service", ended_at=utcnow(), seconds=5.0,
            requests=3, errors=0,
        )
    )  # fmt: skip
    db.flush()
    assert [where[p] for p in pinned(db, service["id"])] == ["eu"]  # silent: replaced
    db.refresh(job)
    assert job.state == JobState.cancelled
    kinds = db.scalars(select(ServiceEvent.kind).where(ServiceEvent.service_id == service["id"]))
    assert "replica_lost" in set(kinds)


def test_a_retried_deploy_returns_the_first_service(developer: Any) -> None:
    body = {
        "artifact": developer.sha["artifact"],
        "inputs": developer.sha["inputs"],
        "users": [AMSTERDAM],
        "latency_slo_ms": 30,
        "max_price_per_hour": "3.00",
    }
    key = {"Idempotency-Key": "deploy-1"}
    first = developer.post("/v1/services", json=body, headers=key)
    assert first.status_code == 201, first.text
    again = developer.post("/v1/services", json=body, headers=key)
    assert again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    other = developer.post("/v1/services", json={**body, "latency_slo_ms": 31}, headers=key)
    assert other.status_code == 409
    assert other.json()["error"]["field"] == "header.Idempotency-Key"
    assert developer.get("/v1/services").json()["total"] == 1


def test_a_service_whose_replicas_keep_failing_fails(db: Session, developer: Any) -> None:
    offers(db, "eu")
    service = deploy(developer, users=[AMSTERDAM])
    for attempt in range(services.MAX_FAILURES):
        assert len(pinned(db, service["id"])) == 1, attempt
        job = db.scalars(
            select(Job).where(Job.service_id == service["id"], Job.state == JobState.open)
        ).one()
        job.move_to(JobState.matched)
        job.move_to(JobState.failed)
        job.error = f"the program crashed ({attempt})"
        db.flush()
    assert pinned(db, service["id"]) == []
    row = db.get_one(Service, service["id"])
    assert row.state == "failed"
    assert row.error is not None
    assert "3 replicas failed before any served; the last: the program crashed" in row.error
    shown = developer.get(f"/v1/services/{service['id']}").json()
    assert shown["state"] == "failed"
    assert shown["events"][0]["kind"] == "failed"


def test_two_services_do_not_plan_on_the_same_free_accelerator(db: Session, developer: Any) -> None:
    provider, _ = make_account(db, Role.provider)
    make_offer(db, provider, accelerator="cpu", count=1, price_per_hour="1.00", **PLACES["eu"])
    first, second = deploy(developer, users=[AMSTERDAM]), deploy(developer, users=[AMSTERDAM])
    services.reconcile(db, get_settings())
    pins = {
        service["id"]: db.scalars(
            select(Job.pinned_offer_id).where(Job.service_id == service["id"])
        ).all()
        for service in (first, second)
    }
    assert sorted(len(p) for p in pins.values()) == [0, 1]
    waiting = db.get_one(Service, second["id"]).placement_note or ""
    assert "no offer it may use" in waiting or "no free offer" in waiting
