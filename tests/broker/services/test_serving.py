"""Issue 26 end to end on this CPU: deploy a function as a service, its replica placed
and started by a real agent, requests relayed to it with the right results."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from sqlalchemy import Engine

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
