from __future__ import annotations

from typing import Any

from tests.conftest import ClientFactory


def test_liveness_and_readiness(client_for: ClientFactory) -> None:
    client = client_for(None)
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ok"}


def test_api_description_is_served(client_for: ClientFactory) -> None:
    client = client_for(None)
    spec = client.get("/openapi.json").json()
    for path in (
        "/v1/offers",
        "/v1/offers/{offer_id}",
        "/v1/jobs",
        "/v1/jobs/{job_id}/cancel",
        "/v1/market/book",
        "/v1/catalog",
        "/healthz",
    ):
        assert path in spec["paths"], path
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


def test_unknown_route_and_method_use_the_error_shape(client_for: ClientFactory) -> None:
    client = client_for(None)
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    wrong = client.put("/healthz")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"


def test_a_failed_commit_is_reported_not_hidden() -> None:
    """The session's transaction ends before the response goes out."""
    from collections.abc import Iterator

    from fastapi.testclient import TestClient

    from broker.app import create_app
    from broker.db import get_session

    app = create_app(auto_bill=False)

    def failing_commit() -> Iterator[object]:
        yield object()
        raise RuntimeError("the database refused the commit")

    app.dependency_overrides[get_session] = failing_commit
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/readyz")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"


def test_oversized_and_unreadable_bodies_get_clear_4xx(client_for: ClientFactory) -> None:
    client = client_for("bk_whatever")
    big = b'{"a": "' + b"x" * 1_100_000 + b'"}'
    response = client.post("/v1/jobs", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"
    nested = b"[" * 100_000 + b"]" * 100_000
    response = client.post("/v1/jobs", content=nested, headers={"content-type": "application/json"})
    assert response.status_code in (401, 422)  # refused, and never a 500


def test_health_answers_head_too(client_for: ClientFactory) -> None:
    assert client_for(None).head("/healthz").status_code == 200


def test_deadlocks_and_serialisation_failures_ask_for_a_retry() -> None:
    from fastapi.testclient import TestClient
    from sqlalchemy.exc import OperationalError

    from broker.app import create_app

    class Deadlock(Exception):
        sqlstate = "40P01"

    app = create_app(auto_clear=False, auto_bill=False)

    @app.get("/boom")
    def boom() -> None:
        raise OperationalError("UPDATE offers ...", {}, Deadlock())

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "retry"


def test_a_served_worker_tunes_its_interpreter_at_startup(fresh_engine: Any) -> None:
    """``broker serve``'s workers freeze what is alive at startup out of the garbage
    collector's reach and shorten the thread switch interval; the test app does not."""
    import gc
    import sys

    from fastapi.testclient import TestClient

    from broker.app import create_app
    from broker.db import request_engine

    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    try:
        with TestClient(create_app(auto_clear=False, auto_bill=False)):
            assert gc.get_freeze_count() == 0
            assert sys.getswitchinterval() == interval
        app = create_app(auto_clear=False, auto_bill=False, served=True)
        app.dependency_overrides[request_engine] = lambda: fresh_engine
        with TestClient(app) as client:
            assert gc.get_freeze_count() > 10_000
            assert sys.getswitchinterval() == 0.0005
            assert gc.get_threshold()[0] == 7_000
            assert client.get("/readyz").status_code == 200
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        sys.setswitchinterval(interval)
