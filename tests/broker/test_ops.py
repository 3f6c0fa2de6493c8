"""Operations: request ids, structured logs, metrics, rate limits, interrupted rounds."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from broker.config import get_settings
from broker.db import get_session, transaction
from broker.market.clearing import run_round
from broker.models.account import Role
from broker.models.market import ClearingRound
from broker.observability import JsonFormatter, RequestIdFilter
from tests.conftest import ClientFactory, signed_in
from tests.factories import job_body, make_account


def test_every_answer_carries_a_request_id(db: Session, client_for: ClientFactory) -> None:
    client = signed_in(db, client_for, Role.developer)
    first, second = client.get("/v1/me"), client.get("/v1/me")
    assert len(first.headers["x-request-id"]) == 32
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    mine = client.get("/v1/me", headers={"X-Request-ID": "trace-42.a_b"})
    assert mine.headers["x-request-id"] == "trace-42.a_b"
    odd = client.get("/v1/me", headers={"X-Request-ID": "no spaces\tor tabs"})
    assert odd.headers["x-request-id"] != "no spaces\tor tabs"
    assert client_for(None).get("/v1/me").headers["x-request-id"]  # errors too


@pytest.fixture
def json_lines() -> Iterator[list[dict[str, Any]]]:
    """What the broker logs while the test runs, as the JSON lines `broker serve` writes."""
    lines: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(self.format(record)))

    handler = Collect()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lines
    root.removeHandler(handler)
    root.setLevel(level)


def test_access_lines_are_json_with_the_request_id_and_no_key(
    db: Session, client_for: ClientFactory, json_lines: list[dict[str, Any]]
) -> None:
    account, key = make_account(db, Role.developer)
    client = client_for(key)
    answer = client.post("/v1/jobs", json=job_body())
    assert answer.status_code == 201
    (line,) = [x for x in json_lines if x["logger"] == "broker.access"]
    assert line["request_id"] == answer.headers["x-request-id"]
    assert (line["method"], line["route"], line["status"]) == ("POST", "/v1/jobs", 201)
    assert line["account_id"] == account.id
    assert line["duration_ms"] >= 0
    assert line["level"] == "info"
    assert key not in json.dumps(json_lines)


def test_metrics_count_requests_and_read_the_market(
    db: Session, client_for: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_METRICS_TOKEN", "metrics-token-for-tests")
    monkeypatch.setenv("BROKER_METRICS_CACHE_SECONDS", "0")
    get_settings.cache_clear()
    client = signed_in(db, client_for, Role.developer)
    client.post("/v1/jobs", json=job_body())
    scrape = client_for(None).get(
        "/metrics", headers={"Authorization": "Bearer metrics-token-for-tests"}
    )
    monkeypatch.undo()
    get_settings.cache_clear()
    text = scrape.text
    assert 'broker_http_requests_total{method="POST",route="/v1/jobs",status="201"}' in text
    assert "broker_http_request_duration_seconds_bucket" in text
    assert 'broker_jobs{state="open"}' in text
    assert "broker_nodes" in text
    assert "broker_clearing_rounds_total" in text


def test_a_key_over_its_rate_gets_429_with_retry_after(
    db: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker.app import create_app

    monkeypatch.setenv("BROKER_RATE_LIMIT_PER_SECOND", "0.5")
    monkeypatch.setenv("BROKER_RATE_LIMIT_BURST", "3")
    get_settings.cache_clear()
    try:
        app = create_app(auto_clear=False, auto_bill=False)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()

    def session_override() -> Iterator[Session]:
        with db.begin_nested():
            yield db

    app.dependency_overrides[get_session] = session_override
    _, key = make_account(db, Role.developer)
    _, other_key = make_account(db, Role.developer)
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        codes = [client.get("/v1/me").status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        refused = client.get("/v1/me")
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "2"
        assert refused.json()["error"]["code"] == "rate_limited"
        assert refused.headers["x-request-id"]
        assert client.get("/healthz").status_code == 200  # probes are never limited
        other = client.get("/v1/me", headers={"Authorization": f"Bearer {other_key}"})
        assert other.status_code == 200


def test_a_round_cut_short_by_a_restart_is_closed_by_the_next(fresh_engine: Engine) -> None:
    with transaction(fresh_engine) as session:
        session.add(ClearingRound(id="rnd_interrupted", trigger="auto", status="running"))
    run_round(fresh_engine, get_settings(), "manual")
    with transaction(fresh_engine, write=False) as session:
        old = session.get_one(ClearingRound, "rnd_interrupted")
        assert old.status == "failed"
        assert old.error is not None
        assert "interrupted" in old.error
        assert old.finished_at is not None
        running = session.scalars(
            select(ClearingRound).where(ClearingRound.status == "running")
        ).all()
        assert running == []
