"""Abuse: API keys never reach the logs, and cross-origin browsers are not let in."""

from __future__ import annotations

import logging

import httpx
import pytest
from sqlalchemy import Engine

from broker.accounts.models import Role
from broker.app import create_app
from broker.db import request_engine, transaction
from broker.sdk import Client
from tests.conftest import ClientFactory, LiveServer
from tests.factories import job_body, make_account

PLACE = {"region": "europe-west4", "country": "NL", "lat": 53.44, "lon": 6.84}


def test_api_keys_never_reach_the_logs(
    fresh_engine: Engine, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """Everything logged while keys are used, refused and issued (every logger at DEBUG:
    the server's access log, SQL statements with their parameters, the HTTP clients'),
    and the process's own output, hold no key."""
    # SQLAlchemy sets its loggers to WARN itself; the root's DEBUG comes last, since
    # set_level also sets the capturing handler's level.
    caplog.set_level(logging.INFO, logger="sqlalchemy.engine")
    caplog.set_level(logging.DEBUG)
    with transaction(fresh_engine) as session:
        _, developer = make_account(session, Role.developer)
        _, provider = make_account(session, Role.provider)
        _, admin = make_account(session, Role.admin)
    app = create_app(auto_clear=False, auto_bill=False)
    app.dependency_overrides[request_engine] = lambda: fresh_engine
    # No log_config: uvicorn's loggers propagate to the root, where caplog listens.
    with LiveServer(app, log_config=None, log_level="debug", access_log=True) as url:
        keys = [developer, provider, admin]
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {developer}"}) as dev:
            assert dev.get("/v1/me").status_code == 200
            job = dev.post("/v1/jobs", json=job_body(), headers={"Idempotency-Key": "k-1"})
            assert job.status_code == 201
            assert dev.get(f"/v1/jobs/{job.json()['id']}").status_code == 200
            assert dev.post("/v1/jobs", json={"accelerators": "many"}).status_code == 422
            assert dev.get("/v1/accounts").status_code == 403
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}) as ops:
            created = ops.post("/v1/accounts", json={"name": "newcomer", "role": "developer"})
            assert created.status_code == 201
            keys.append(created.json()["api_key"])
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {provider}"}) as prov:
            node = prov.post("/v1/nodes", json={"name": "box-1", **PLACE})
            assert node.status_code == 201
            node_key = node.json()["api_key"]
            keys.append(node_key)
        node_id = node.json()["node"]["id"]
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {node_key}"}) as agent:
            assert agent.post(f"/v1/nodes/{node_id}/heartbeat", json={}).status_code == 200
            assert agent.get("/v1/offers").status_code == 403
        wrong = developer[:-4] + "xxxx"
        keys.append(wrong)
        assert httpx.get(f"{url}/v1/me", headers={"Authorization": f"Bearer {wrong}"}).is_error
        with Client(url, api_key=developer) as sdk:
            assert sdk.jobs()
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert "GET /v1/me" in logged  # the access log was captured
    assert "SELECT" in logged  # and so were the SQL statements
    for key in keys:
        assert key not in logged
        assert key[10:] not in logged  # not even the part past the listed prefix


def test_cors_is_closed_by_default(client_for: ClientFactory) -> None:
    client = client_for(None)
    preflight = client.options(
        "/v1/jobs",
        headers={
            "Origin": "https://elsewhere.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-credentials" not in preflight.headers
    simple = client.get("/v1/catalog", headers={"Origin": "https://elsewhere.example"})
    assert simple.status_code == 200
    assert "access-control-allow-origin" not in simple.headers
