"""Issue 26 end to end on this CPU: deploy a function as a service, its replica placed
and started by a real agent, requests relayed to it with the right results."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from broker.cli import app
from broker.config import get_settings
from broker.db import transaction
from broker.sdk import Client
from broker.services import service as services
from tests.broker.agent.test_node import _start_agent, _wait, clear

USERS = [{"name": "amsterdam", "lat": 52.37, "lon": 4.9, "share": 1.0}]


def model(w: Any, x: Any) -> Any:
    return jnp.tanh(x @ w)


def prepare(engine: Engine) -> None:
    with transaction(engine) as session:
        services.reconcile(session, get_settings())
    clear(engine)


@pytest.fixture
def agent(live_url: str, fresh_engine: Engine) -> Iterator[dict[str, Any]]:
    yield from _start_agent(live_url, fresh_engine)


def test_deploy_infer_undeploy(agent: dict[str, Any]) -> None:
    developer: Client = agent["developer"]
    engine: Engine = agent["engine"]
    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    x = np.ones((2, 4), dtype=np.float32)
    service = developer.deploy(
        model, w, x, users=USERS, latency_slo_ms=50, max_price_per_hour=1.0, max_replicas=2
    )
    assert service.state == "deploying"
    prepare(engine)
    service.wait_ready(timeout=60)
    for k in range(3):
        got = service.infer(w, x * k)
        np.testing.assert_allclose(np.asarray(got), np.tanh((x * k) @ w), rtol=1e-6)
    assert service.last_replica == service.replicas[0]["allocation_id"]
    service.undeploy()
    assert service.state == "undeployed"
    _wait(lambda: not agent["node"].running())


HELLO = str(Path(__file__).resolve().parents[3] / "examples" / "hello.py")
ARGS = "[[[0.5, -1.0], [1.0, 0.25]], [[1.0, 2.0], [3.0, 4.0]]]"


def test_the_cli_deploys_calls_shows_and_undeploys(agent: dict[str, Any]) -> None:
    developer: Client = agent["developer"]
    env = {
        "BROKER_URL": developer.http.url,
        "BROKER_API_KEY": developer.http.authorization.removeprefix("Bearer "),
        "BROKER_API_KEY_FILE": "",
    }

    def broker(*args: str) -> Any:
        result = CliRunner().invoke(app, list(args), env=env)
        assert result.exit_code == 0, result.output
        return result.stdout

    deployed = broker(
        "services", "deploy", f"{HELLO}:predict", "--args", ARGS, "--users", "ams=52.4,4.9",
        "--latency-slo-ms", "40", "--max-price", "1", "--platform", "cpu",
    )  # fmt: skip
    service_id = deployed.strip().splitlines()[-1]
    prepare(agent["engine"])
    developer.service(service_id).wait_ready(timeout=60)
    out = json.loads(broker("services", "infer", service_id, "--args", ARGS, "--at", "52,5"))
    expected = predict_reference()
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6)
    shown = broker("services", "show", service_id)
    assert "serving" in shown or "deploying" in shown
    assert "ams" in shown  # the user region, with its figures
    assert service_id in broker("services", "list")
    assert "undeployed" in broker("services", "undeploy", service_id)
    bad = CliRunner().invoke(app, ["services", "deploy", f"{HELLO}:predict", "--args", ARGS,
                                   "--users", "nowhere", "--latency-slo-ms", "40",
                                   "--max-price", "1"], env=env)  # fmt: skip
    assert bad.exit_code == 2
    assert "NAME=LAT,LON" in bad.output


def predict_reference() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("hello_reference", HELLO)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params, x = json.loads(ARGS)
    return np.asarray(module.predict(np.asarray(params, np.float32), np.asarray(x, np.float32)))


def test_a_broker_without_the_replica_passes_requests_to_the_one_with_it(
    fresh_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two brokers on one database (replicas of a deployment): the replica's agent
    connects to the first; a request to the second is passed to the first's relay."""
    from broker.app import create_app
    from broker.db import request_engine
    from tests.conftest import LiveServer

    monkeypatch.setenv("BROKER_SERVICE_WINDOW_S", "0.5")
    get_settings.cache_clear()
    apps = [create_app(auto_clear=False, auto_bill=False) for _ in range(2)]
    for app_ in apps:
        app_.dependency_overrides[request_engine] = lambda: fresh_engine
    # Two servers in one process: one event loop implementation for both.
    with (
        LiveServer(apps[0], loop="asyncio") as first,
        LiveServer(apps[1], loop="asyncio") as second,
    ):
        apps[0].state.relay_address, apps[1].state.relay_address = first, second
        running = _start_agent(first, fresh_engine)
        agent = next(running)
        try:
            developer: Client = agent["developer"]
            w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
            x = np.ones((2, 4), dtype=np.float32)
            service = developer.deploy(
                model, w, x, users=USERS, latency_slo_ms=50, max_price_per_hour=1.0
            )
            prepare(fresh_engine)
            service.wait_ready(timeout=60)
            (replica,) = service.replicas
            other = Client(second, developer.http.authorization.removeprefix("Bearer "))
            through = other.service(service.id)
            _wait(lambda: _answers(through, w, x))
            np.testing.assert_allclose(np.asarray(through.infer(w, x)), np.tanh(x @ w), rtol=1e-6)
            assert through.last_replica == replica["allocation_id"]
            other.close()
            service.undeploy()
        finally:
            next(running, None)
    get_settings.cache_clear()


def _answers(service: Any, *args: Any) -> bool:
    from broker.sdk.http import BrokerError

    try:
        service.infer(*args)
    except BrokerError as e:
        if e.status != 503:
            raise
        return False  # the first broker's relay has not written its replica's window yet
    return True
