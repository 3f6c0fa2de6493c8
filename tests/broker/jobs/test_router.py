from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from sqlalchemy.orm import Session

from broker.jobs import router as router_module
from broker.models.account import Role
from broker.models.job_state import JobState
from tests.conftest import ClientFactory, signed_in
from tests.factories import job_body, make_account, make_job


@pytest.fixture
def developer(db: Session, client_for: ClientFactory) -> Any:
    return signed_in(db, client_for, Role.developer)


def test_submit_a_job_with_a_stated_duration(developer: Any) -> None:
    body = job_body(
        name="finetune",
        accelerators=2,
        min_memory_gib=40,
        vendors=["nvidia", "amd", "nvidia"],
        accelerator_models=["H100", "mi300x"],
        platforms=["rocm", "cuda"],
        max_price_per_hour="4.10",
        deadline_hours=6,
        latency_slo_ms=80,
        user_lat=52.37,
        user_lon=4.9,
        data_region="europe-west4",
        data_gb=120,
        allowed_countries=["NL", "DE"],
        priority=3,
    )
    response = developer.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["id"].startswith("job_")
    assert job["state"] == "open"
    assert job["account_id"] == developer.account.id
    assert job["vendors"] == ["amd", "nvidia"]
    assert job["accelerator_models"] == ["h100-sxm", "mi300x"]
    assert job["platforms"] == ["cuda", "rocm"]
    assert job["allowed_countries"] == ["DE", "NL"]
    assert job["max_price_per_hour"] == "4.10"
    assert (job["duration_hours"], job["dtype"], job["priority"]) == (2, None, 3)
    detail = developer.get(f"/v1/jobs/{job['id']}").json()
    assert {k: v for k, v in detail.items() if k not in ("allocation", "unmatched")} == job
    assert detail["allocation"] is None
    assert detail["unmatched"]["summary"] == "No offers are listed yet."


def test_submit_a_job_by_its_work(developer: Any) -> None:
    body = job_body(duration_hours=None, flops=3.6e18, bytes=1e15)
    job = developer.post("/v1/jobs", json=body).json()
    assert (job["flops"], job["bytes"], job["dtype"], job["duration_hours"]) == (
        3.6e18,
        1e15,
        "bf16",
        None,
    )
    fp32 = developer.post("/v1/jobs", json={**body, "dtype": "fp32"}).json()
    assert fp32["dtype"] == "fp32"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"duration_hours": None}, "body.duration_hours"),
        ({"duration_hours": None, "flops": 0, "bytes": 0}, "body.duration_hours"),
        ({"user_lat": 10}, "body.user_lon"),
        ({"latency_slo_ms": 50}, "body.latency_slo_ms"),
        ({"data_gb": 10}, "body.data_region"),
        ({"duration_hours": 8, "deadline_hours": 4}, "body.deadline_hours"),
        ({"platforms": []}, "body.platforms"),
        ({"platforms": ["metal"]}, "body.platforms.0"),
        ({"accelerators": 0}, "body.accelerators"),
        ({"priority": 0}, "body.priority"),
        ({"max_price_per_hour": "1.0000001"}, "body.max_price_per_hour"),
        ({"allowed_countries": ["nl"]}, "body.allowed_countries.0"),
        ({"dtype": "int4"}, "body.dtype"),
        ({"state": "succeeded"}, "body.state"),
    ],
)
def test_bad_jobs_name_the_field(developer: Any, change: dict[str, Any], field: str) -> None:
    response = developer.post("/v1/jobs", json=job_body(**change))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    assert developer.get("/v1/jobs").json()["total"] == 0


def test_providers_cannot_submit_jobs(db: Session, client_for: ClientFactory) -> None:
    _, key = make_account(db, Role.provider)
    assert client_for(key).post("/v1/jobs", json=job_body()).status_code == 403


def test_a_retried_submission_returns_the_first_job(developer: Any) -> None:
    key = str(uuid.uuid4())
    first = developer.post("/v1/jobs", json=job_body(), headers={"Idempotency-Key": key})
    retry = developer.post("/v1/jobs", json=job_body(), headers={"Idempotency-Key": key})
    assert first.status_code == 201
    assert retry.status_code == 200
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json()["id"] == first.json()["id"]
    assert developer.get("/v1/jobs").json()["total"] == 1

    other = developer.post("/v1/jobs", json=job_body(), headers={"Idempotency-Key": "another"})
    assert other.status_code == 201
    assert developer.get("/v1/jobs").json()["total"] == 2


def test_a_reused_key_with_a_different_body_is_refused(developer: Any) -> None:
    headers = {"Idempotency-Key": "k-1"}
    assert developer.post("/v1/jobs", json=job_body(), headers=headers).status_code == 201
    reused = developer.post("/v1/jobs", json=job_body(max_price_per_hour="9.00"), headers=headers)
    assert reused.status_code == 422
    assert reused.json()["error"]["code"] == "idempotency_key_reused"
    assert developer.get("/v1/jobs").json()["total"] == 1


def test_an_equivalent_body_counts_as_the_same_request(developer: Any) -> None:
    headers = {"Idempotency-Key": "k-2"}
    body = job_body(platforms=["cuda", "rocm"], accelerator_models=["h100-sxm"])
    first = developer.post("/v1/jobs", json=body, headers=headers)
    same = {**body, "platforms": ["rocm", "cuda", "cuda"], "accelerator_models": ["H100"]}
    retry = developer.post("/v1/jobs", json=same, headers=headers)
    assert retry.status_code == 200, retry.text
    assert retry.json()["id"] == first.json()["id"]


def test_idempotency_keys_belong_to_one_account(
    db: Session, developer: Any, client_for: ClientFactory
) -> None:
    _, key = make_account(db, Role.developer)
    other = client_for(key)
    headers = {"Idempotency-Key": "shared"}
    mine = developer.post("/v1/jobs", json=job_body(), headers=headers).json()
    theirs = other.post("/v1/jobs", json=job_body(), headers=headers)
    assert theirs.status_code == 201
    assert theirs.json()["id"] != mine["id"]


def test_developers_see_only_their_own_jobs(
    db: Session, developer: Any, client_for: ClientFactory
) -> None:
    mine = developer.post("/v1/jobs", json=job_body()).json()
    stranger, key = make_account(db, Role.developer)
    theirs = make_job(db, stranger)
    listing = developer.get("/v1/jobs").json()
    assert [j["id"] for j in listing["items"]] == [mine["id"]]
    assert developer.get(f"/v1/jobs/{theirs.id}").status_code == 404
    assert developer.post(f"/v1/jobs/{theirs.id}/cancel").status_code == 404
    assert client_for(key).get(f"/v1/jobs/{mine['id']}").status_code == 404

    _, admin_key = make_account(db, Role.admin)
    admin = client_for(admin_key)
    everyone = admin.get("/v1/jobs", params={"limit": 200}).json()
    assert {mine["id"], theirs.id} <= {j["id"] for j in everyone["items"]}
    only = admin.get("/v1/jobs", params={"account_id": stranger.id}).json()
    assert [j["id"] for j in only["items"]] == [theirs.id]
    assert admin.get(f"/v1/jobs/{mine['id']}").status_code == 200


def test_list_filters_by_state_and_pages_newest_first(db: Session, developer: Any) -> None:
    ids = [developer.post("/v1/jobs", json=job_body()).json()["id"] for _ in range(3)]
    developer.post(f"/v1/jobs/{ids[0]}/cancel")
    open_jobs = developer.get("/v1/jobs", params={"state": "open"}).json()
    assert {j["id"] for j in open_jobs["items"]} == set(ids[1:])
    cancelled = developer.get("/v1/jobs", params={"state": "cancelled"}).json()
    assert [j["id"] for j in cancelled["items"]] == [ids[0]]
    page = developer.get("/v1/jobs", params={"limit": 1, "offset": 1}).json()
    assert page["total"] == 3
    assert len(page["items"]) == 1
    assert developer.get("/v1/jobs", params={"state": "lost"}).status_code == 422


def test_cancel_follows_the_state_machine(db: Session, developer: Any) -> None:
    job = developer.post("/v1/jobs", json=job_body()).json()
    cancelled = developer.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    assert developer.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200

    done = make_job(db, developer.account)
    for state in (JobState.matched, JobState.running, JobState.succeeded):
        done.move_to(state)
    db.flush()
    refused = developer.post(f"/v1/jobs/{done.id}/cancel")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "invalid_transition"
    assert developer.get(f"/v1/jobs/{done.id}").json()["state"] == "succeeded"


def test_control_characters_and_odd_ids_are_refused_not_crashed(developer: Any) -> None:
    named = developer.post("/v1/jobs", json=job_body(name="nul\u0000byte"))
    assert named.status_code == 422
    assert named.json()["error"]["field"] == "body.name"
    for job_id in ("job%00x", "x" * 65, "job_ü"):
        response = developer.get(f"/v1/jobs/{job_id}")
        assert response.status_code in (404, 422), (job_id, response.status_code)
    assert developer.get("/v1/offers", params={"region": "eu\u0000"}).status_code == 422


# What differs between two submissions of the same body: the job itself.
_PER_JOB = {"id", "created_at", "updated_at"}


def test_the_short_way_answers_as_fastapi_does(
    developer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Well-formed submissions skip FastAPI's dependency solving (``broker.shortcuts``);
    a content type only FastAPI reads goes its way. Both answer alike."""
    short: list[object] = []
    original = router_module._json

    def counted(*args: Any) -> Any:
        short.append(args)
        return original(*args)

    monkeypatch.setattr(router_module, "_json", counted)
    body = job_body(name="same", accelerators=2, max_price_per_hour="3.10", budget_usd="9.5")
    headers = {"Content-Type": "application/json; charset=utf-8"}
    fast = developer.post("/v1/jobs", content=json.dumps(body), headers=headers)
    assert (fast.status_code, len(short)) == (201, 1), fast.text
    slow = developer.post(
        "/v1/jobs", content=json.dumps(body), headers={"Content-Type": "application/vnd+json"}
    )
    assert (slow.status_code, len(short)) == (201, 1), slow.text
    assert fast.headers["content-type"] == slow.headers["content-type"] == "application/json"
    a, b = fast.json(), slow.json()
    assert a["id"] != b["id"]
    assert {k: v for k, v in a.items() if k not in _PER_JOB} == {
        k: v for k, v in b.items() if k not in _PER_JOB
    }
    # A retry, both ways: the first job, marked as replayed.
    key = {"Idempotency-Key": str(uuid.uuid4())}
    first = developer.post("/v1/jobs", json=body, headers=key)
    for content_type in ("application/json", "application/problem+json"):
        retry = developer.post(
            "/v1/jobs", content=json.dumps(body), headers={**key, "Content-Type": content_type}
        )
        assert retry.status_code == 200, retry.text
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert retry.json() == first.json()
    assert len(short) == 3


@pytest.mark.parametrize(
    ("headers", "content", "status", "code"),
    [
        ({"Authorization": "Basic abc"}, None, 401, None),  # not a bearer key: checked first
        ({"Authorization": "Bearer bk_nope"}, None, 401, None),
        ({"Authorization": "Bearer bk_nope"}, "{", 422, "body"),  # FastAPI reads JSON first
        ({"Idempotency-Key": "has space"}, None, 422, "header"),
        ({}, "{", 422, "body"),
        ({}, "[]", 422, "body"),
        ({"Content-Type": "text/plain"}, None, 422, "body"),
    ],
)
def test_what_the_short_way_leaves_gets_fastapis_errors(
    developer: Any, headers: dict[str, str], content: str | None, status: int, code: str | None
) -> None:
    body = content if content is not None else json.dumps(job_body())
    response = developer.post(
        "/v1/jobs", content=body, headers={"Content-Type": "application/json", **headers}
    )
    assert response.status_code == status, response.text
    if code is not None:
        assert response.json()["error"]["field"].startswith(code)
