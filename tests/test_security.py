"""Abuse: API keys never reach the logs, cross-origin browsers are not let in, rate
limits hold however a key is spelled or made up, and /metrics is not for everyone."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

from broker.accounts.service import issue_key
from broker.app import create_app
from broker.config import get_settings
from broker.db import get_session, get_transactions, request_engine, transaction
from broker.models.account import Role
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


def _limited_app(db: Session, monkeypatch: pytest.MonkeyPatch, **env: str) -> FastAPI:
    """The app with rate limits on (``env``: BROKER_RATE_LIMIT_* settings), on the
    test transaction."""
    for name, value in env.items():
        monkeypatch.setenv(f"BROKER_RATE_LIMIT_{name}", value)
    get_settings.cache_clear()
    try:
        app = create_app(auto_clear=False, auto_bill=False)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()

    def session_override() -> Iterator[Session]:
        with db.begin_nested():
            yield db

    @contextmanager
    def nested(*, write: bool = True) -> Iterator[Session]:
        with db.begin_nested():
            yield db

    app.dependency_overrides[get_session] = session_override
    app.dependency_overrides[get_transactions] = lambda: nested
    return app


def test_spellings_of_one_key_share_its_rate_limit(
    db: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Authentication reads 'Bearer' in any case and strips the key: so does the limiter,
    and every spelling of a key, every key of an account, draws on the account's bucket."""
    app = _limited_app(db, monkeypatch, PER_SECOND="0.5", BURST="4")
    account, key = make_account(db, Role.developer)
    second = issue_key(db, account)
    spellings = [f"Bearer {key}", f"bearer {key}", f"BEARER  {key}", f"Bearer {second} "]
    with TestClient(app) as client:
        codes = [client.get("/v1/me", headers={"Authorization": s}).status_code for s in spellings]
        assert codes == [200, 200, 200, 200]
        for spelling in spellings:
            refused = client.get("/v1/me", headers={"Authorization": spelling})
            assert refused.status_code == 429, spelling
            assert "account" in refused.json()["error"]["message"]


def test_made_up_keys_are_limited_per_address_before_the_database(
    db: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rotating random keys gets an address the anonymous budget and no more; once it is
    spent, requests are refused without a database query, while a known key goes on."""
    app = _limited_app(
        db, monkeypatch, PER_SECOND="100", ANONYMOUS_PER_SECOND="0.1", ANONYMOUS_BURST="5"
    )
    _, key = make_account(db, Role.developer)
    queries: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        queries.append(statement)

    with TestClient(app) as client:
        # A key's first request counts per address too: the limiter has not seen it pass.
        assert client.get("/v1/me", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        event.listen(Engine, "before_cursor_execute", count)
        try:
            codes = [
                client.get(
                    "/v1/me", headers={"Authorization": f"Bearer bk_{secrets.token_urlsafe(32)}"}
                ).status_code
                for _ in range(12)
            ]
            spent = len(queries)
            refused = client.get("/v1/jobs", headers={"Authorization": "Bearer bk_made_up"})
            assert len(queries) == spent  # refused before any database work
        finally:
            event.remove(Engine, "before_cursor_execute", count)
        assert codes == [401] * 4 + [429] * 8
        assert refused.status_code == 429
        assert "client address" in refused.json()["error"]["message"]
        # Unknown keys and no key share the address's budget; a known key does not.
        assert client.get("/v1/catalog").status_code == 429
        assert client.get("/v1/me", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_metrics_answer_the_token_or_this_machine_only(
    fresh_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(auto_clear=False, auto_bill=False)
    app.dependency_overrides[request_engine] = lambda: fresh_engine
    with TestClient(app) as remote:  # TestClient's requests come from "testclient"
        refused = remote.get("/metrics")
        assert refused.status_code == 403
        assert "BROKER_METRICS_TOKEN" in refused.json()["error"]["message"]
    with LiveServer(app) as url:
        assert httpx.get(f"{url}/metrics").status_code == 200  # loopback
    monkeypatch.setenv("BROKER_METRICS_TOKEN", "a-long-enough-metrics-token")
    get_settings.cache_clear()
    try:
        with TestClient(app) as remote:
            assert remote.get("/metrics").status_code == 401
            wrong = {"Authorization": "Bearer a-long-enough-metrics-tokeN"}
            assert remote.get("/metrics", headers=wrong).status_code == 401
            right = {"Authorization": "Bearer a-long-enough-metrics-token"}
            assert remote.get("/metrics", headers=right).status_code == 200
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_metrics_read_the_database_at_most_once_per_cache_time(
    fresh_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_METRICS_CACHE_SECONDS", "60")
    get_settings.cache_clear()
    app = create_app(auto_clear=False, auto_bill=False)
    app.dependency_overrides[request_engine] = lambda: fresh_engine
    queries: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        queries.append(statement)

    try:
        with LiveServer(app) as url:
            assert httpx.get(f"{url}/metrics").status_code == 200
            event.listen(fresh_engine, "before_cursor_execute", count)
            try:
                for _ in range(5):
                    scrape = httpx.get(f"{url}/metrics")
                    assert "broker_jobs" in scrape.text or "broker_nodes" in scrape.text
            finally:
                event.remove(fresh_engine, "before_cursor_execute", count)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert queries == []
