"""The provider's side of a match over HTTP: only the owner reports, and reports are checked."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest
from sqlalchemy import Engine

from broker.config import get_settings
from broker.db import transaction
from broker.market.clearing import run_round
from broker.models.account import Role
from broker.portable import arrays
from broker.portable.artifact import package_step
from tests.broker.portable.programs import sgd_args, sgd_step
from tests.conftest import ClientFactory
from tests.factories import make_account, offer_body

BIN = {"Content-Type": "application/octet-stream"}
CPU_OFFER = offer_body(accelerator="cpu", count=1, price_per_hour="0.10")


def _client(engine: Engine, clients: ClientFactory, role: Role) -> Any:
    with transaction(engine) as session:
        account, key = make_account(session, role)
    client: Any = clients(key)
    client.account = account
    return client


def _upload(client: Any, path: str, data: bytes) -> str:
    response = client.post(path, content=data, headers=BIN)
    assert response.status_code in (200, 201), response.text
    return str(response.json()["sha256"])


@pytest.fixture
def matched(fresh_engine: Engine, fresh_client_for: ClientFactory) -> dict[str, Any]:
    """An iterative job of 6 steps matched to a provider's CPU offer."""
    developer = _client(fresh_engine, fresh_client_for, Role.developer)
    provider = _client(fresh_engine, fresh_client_for, Role.provider)
    state, x, y = sgd_args()
    artifact = _upload(developer, "/v1/artifacts", package_step(sgd_step, state, x, y).to_bytes())
    inputs = _upload(developer, "/v1/arrays", arrays.encode(jax.tree.leaves((state, x, y))))
    job = developer.post(
        "/v1/jobs",
        json={
            "artifact": artifact,
            "inputs": inputs,
            "steps": 6,
            "checkpoint_every": 2,
            "max_price_per_hour": "1.00",
        },
    )
    assert job.status_code == 201, job.text
    assert provider.post("/v1/offers", json=CPU_OFFER).status_code == 201
    run_round(fresh_engine, get_settings(), "manual")
    (order,) = provider.get("/v1/allocations").json()
    return {
        "developer": developer,
        "provider": provider,
        "job": job.json(),
        "order": order,
        "state": state,
        "engine": fresh_engine,
        "clients": fresh_client_for,
    }


def test_the_provider_allocation_says_what_to_run(matched: dict[str, Any]) -> None:
    order, job = matched["order"], matched["job"]
    assert order["job_id"] == job["id"]
    assert order["job_state"] == "matched"
    assert order["artifact"] == job["artifact"]
    assert order["inputs"] == job["inputs"]
    assert order["platform"] == "cpu"
    assert order["steps"] == 6
    assert order["checkpoint"] is None
    # The provider may download what the job needs while it holds the allocation.
    provider = matched["provider"]
    assert provider.get(f"/v1/artifacts/{job['artifact']}/content").status_code == 200
    assert provider.get(f"/v1/arrays/{job['inputs']}/content").status_code == 200


def test_only_the_owning_provider_reports(matched: dict[str, Any]) -> None:
    alloc = matched["order"]["allocation_id"]
    other = _client(matched["engine"], matched["clients"], Role.provider)
    assert other.get("/v1/allocations").json() == []
    assert other.post(f"/v1/allocations/{alloc}/start").status_code == 404
    assert other.get(f"/v1/arrays/{matched['job']['inputs']}").status_code == 404
    assert matched["developer"].post(f"/v1/allocations/{alloc}/start").status_code == 403


def test_lifecycle_with_checkpoints_progress_and_result(matched: dict[str, Any]) -> None:
    provider, developer = matched["provider"], matched["developer"]
    alloc, job_id = matched["order"]["allocation_id"], matched["job"]["id"]
    early = provider.post(f"/v1/allocations/{alloc}/finish", json={"outcome": "succeeded"})
    assert early.status_code == 409  # not started yet
    started = provider.post(f"/v1/allocations/{alloc}/start")
    assert started.status_code == 200
    assert started.json()["job_state"] == "running"
    assert provider.post(f"/v1/allocations/{alloc}/start").status_code == 200  # a retry

    assert provider.post(f"/v1/allocations/{alloc}/progress", json={"steps_done": 1}).is_success
    state = [np.asarray(x) for x in jax.tree.leaves(matched["state"])]
    ckpt = _upload(provider, "/v1/arrays", arrays.encode(state))
    body = {"checkpoint": ckpt, "step": 2}
    saved = provider.post(f"/v1/allocations/{alloc}/checkpoint", json=body)
    assert saved.status_code == 200, saved.text
    assert saved.json()["checkpoint"] == ckpt
    assert saved.json()["steps_done"] == 2
    assert provider.post(f"/v1/allocations/{alloc}/checkpoint", json=body).status_code == 200
    older = provider.post(f"/v1/allocations/{alloc}/checkpoint", json={**body, "step": 1})
    assert older.status_code == 422
    wrong = _upload(provider, "/v1/arrays", arrays.encode([np.zeros(3, np.float32)]))
    refused = provider.post(
        f"/v1/allocations/{alloc}/checkpoint", json={"checkpoint": wrong, "step": 4}
    )
    assert refused.status_code == 422
    assert "must hold 2 arrays" in refused.text
    # The developer may read the checkpoint of its job.
    assert developer.get(f"/v1/arrays/{ckpt}").status_code == 200

    missing = provider.post(f"/v1/allocations/{alloc}/finish", json={"outcome": "succeeded"})
    assert missing.status_code == 422
    assert "needs its result" in missing.text
    result = _upload(provider, "/v1/arrays", arrays.encode(state))
    finish = {"outcome": "succeeded", "result": result}
    done = provider.post(f"/v1/allocations/{alloc}/finish", json=finish)
    assert done.status_code == 200
    assert done.json()["state"] == "succeeded"
    assert provider.post(f"/v1/allocations/{alloc}/finish", json=finish).status_code == 200
    job = developer.get(f"/v1/jobs/{job_id}").json()
    assert job["result"] == result
    assert job["steps_done"] == 6
    assert job["attempts"] == 1
    assert developer.get(f"/v1/arrays/{result}/content").status_code == 200
    # Ended: the provider no longer sees it, nor reads its inputs.
    assert provider.get("/v1/allocations").json() == []
    gone = provider.post(f"/v1/allocations/{alloc}/progress", json={"steps_done": 6})
    assert gone.status_code == 409
    assert gone.json()["error"]["code"] == "allocation_ended"


def test_a_cancelled_job_tells_the_provider_to_stop(matched: dict[str, Any]) -> None:
    provider, developer = matched["provider"], matched["developer"]
    alloc = matched["order"]["allocation_id"]
    provider.post(f"/v1/allocations/{alloc}/start")
    assert developer.post(f"/v1/jobs/{matched['job']['id']}/cancel").status_code == 200
    response = provider.post(f"/v1/allocations/{alloc}/progress", json={"steps_done": 3})
    assert response.status_code == 409
    assert "stop running it" in response.json()["error"]["message"]


def test_failure_is_reported_to_the_developer(matched: dict[str, Any]) -> None:
    provider, developer = matched["provider"], matched["developer"]
    alloc = matched["order"]["allocation_id"]
    provider.post(f"/v1/allocations/{alloc}/start")
    failed = provider.post(
        f"/v1/allocations/{alloc}/finish", json={"outcome": "failed", "error": "XLA OOM"}
    )
    assert failed.status_code == 200
    job = developer.get(f"/v1/jobs/{matched['job']['id']}").json()
    assert job["state"] == "failed"
    assert job["error"] == "XLA OOM"


def test_long_poll_waits_for_work(fresh_engine: Engine, fresh_client_for: ClientFactory) -> None:
    import time

    provider = _client(fresh_engine, fresh_client_for, Role.provider)
    started = time.monotonic()
    assert provider.get("/v1/allocations", params={"wait": 0.6}).json() == []
    assert time.monotonic() - started >= 0.5
    assert provider.get("/v1/allocations", params={"wait": 31}).status_code == 422


def _line(seq: int, text: str, stream: str = "agent") -> dict[str, Any]:
    return {"seq": seq, "at": "2026-12-03T10:00:00+00:00", "stream": stream, "text": text}


def test_run_log_lines_are_kept_once_in_order_and_shown_to_the_developer(
    matched: dict[str, Any],
) -> None:
    provider, developer = matched["provider"], matched["developer"]
    alloc, job_id = matched["order"]["allocation_id"], matched["job"]["id"]
    provider.post(f"/v1/allocations/{alloc}/start")
    first = {"steps_done": 1, "log": [_line(0, "fetched"), _line(1, "compiled")]}
    assert provider.post(f"/v1/allocations/{alloc}/progress", json=first).is_success
    # A report sent again (its answer lost) adds nothing; the next carries new lines.
    assert provider.post(f"/v1/allocations/{alloc}/progress", json=first).is_success
    warning = _line(2, "W external/xla: slow", "program")
    finish = {"outcome": "failed", "error": "XLA OOM", "log": [_line(1, "compiled"), warning]}
    assert provider.post(f"/v1/allocations/{alloc}/finish", json=finish).is_success

    lines = developer.get(f"/v1/jobs/{job_id}/logs").json()
    assert [(x["seq"], x["stream"], x["text"]) for x in lines] == [
        (0, "agent", "fetched"),
        (1, "agent", "compiled"),
        (2, "program", "W external/xla: slow"),
    ]
    assert {x["allocation_id"] for x in lines} == {alloc}
    stranger = _client(matched["engine"], matched["clients"], Role.developer)
    assert stranger.get(f"/v1/jobs/{job_id}/logs").status_code == 404


def test_run_log_lines_are_checked_and_capped(matched: dict[str, Any]) -> None:
    provider, developer = matched["provider"], matched["developer"]
    alloc, job_id = matched["order"]["allocation_id"], matched["job"]["id"]
    provider.post(f"/v1/allocations/{alloc}/start")
    naive = {"steps_done": 1, "log": [{**_line(0, "x"), "at": "2026-12-03T10:00:00"}]}
    assert provider.post(f"/v1/allocations/{alloc}/progress", json=naive).status_code == 422
    too_many = {"steps_done": 1, "log": [_line(i, "x") for i in range(201)]}
    assert provider.post(f"/v1/allocations/{alloc}/progress", json=too_many).status_code == 422
    for start in range(0, 1200, 200):
        batch = {"steps_done": 1, "log": [_line(i, f"line {i}") for i in range(start, start + 200)]}
        assert provider.post(f"/v1/allocations/{alloc}/progress", json=batch).is_success
    lines = developer.get(f"/v1/jobs/{job_id}/logs").json()
    assert len(lines) == 1000  # a run keeps 1000 lines: a flood fills no database
    assert lines[-1]["text"] == "line 999"


def test_a_measured_run_records_its_energy_at_the_wall(
    matched: dict[str, Any], fresh_engine: Engine
) -> None:
    from adapters import grid
    from broker.models.market import Allocation

    provider = matched["provider"]
    alloc = matched["order"]["allocation_id"]
    provider.post(f"/v1/allocations/{alloc}/start")
    finish = {"outcome": "failed", "error": "XLA OOM", "accelerator_seconds": 3600}
    # More than an accelerator can draw in the time metered (capped at the wall time since
    # the start, a moment here): refused, named.
    refused = provider.post(f"/v1/allocations/{alloc}/finish", json=finish | {"energy_kwh": 50})
    assert refused.status_code == 422
    assert refused.json()["error"]["field"] == "body.energy_kwh"
    negative = provider.post(f"/v1/allocations/{alloc}/finish", json=finish | {"energy_kwh": -1})
    assert negative.status_code == 422
    done = provider.post(f"/v1/allocations/{alloc}/finish", json=finish | {"energy_kwh": 0.0004})
    assert done.status_code == 200, done.text
    with transaction(fresh_engine, write=False) as session:
        a = session.get_one(Allocation, alloc)
        offer = a.offer_id
        from broker.models.offer import Offer

        o = session.get_one(Offer, offer)
        figures = grid.offer_energy(o.vendor, o.accelerator, o.country, o.region, pue=o.pue)
        assert a.measured_kwh is not None
        assert a.measured_kwh == pytest.approx(0.0004 * figures["pue"])
        assert a.measured_gco2 == pytest.approx(a.measured_kwh * figures["grid_g_per_kwh"])
