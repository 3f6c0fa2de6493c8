"""What a bid without a program is, and bids for hardware that does not exist.

A default broker refuses bids without a program (nothing would run on them). A
broker started for market simulations (BROKER_ALLOW_CAPACITY_BIDS=1, as the tests
are) takes them; an agent matched to one fails it at once with the reason, and the
hardware goes back to the book: no job hangs in ``running``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from broker.config import get_settings
from broker.db import transaction
from broker.market.clearing import run_round
from broker.models.account import Role
from broker.sdk import ProviderClient, run_allocation
from broker.sdk.http import Connection
from tests.conftest import ClientFactory, signed_in
from tests.factories import job_body, make_account, offer_body


@pytest.fixture
def developer(db: Session, client_for: ClientFactory) -> Any:
    return signed_in(db, client_for, Role.developer)


@pytest.fixture
def default_broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("BROKER_ALLOW_CAPACITY_BIDS", "0")
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


def test_a_default_broker_refuses_a_bid_without_a_program(
    default_broker: None, developer: Any
) -> None:
    response = developer.post("/v1/jobs", json=job_body())
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "body.artifact"
    assert "broker jobs submit" in error["message"]
    assert "BROKER_ALLOW_CAPACITY_BIDS" in error["message"]
    assert developer.get("/v1/jobs").json()["items"] == []


def test_an_unknown_model_is_refused_with_the_known_ones(developer: Any) -> None:
    response = developer.post("/v1/jobs", json=job_body(accelerator_models=["nvidia-h9000"]))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "body.accelerator_models"
    assert "'nvidia-h9000'" in error["message"]
    assert "h100-sxm" in error["message"]
    assert "mi300x" in error["message"]
    assert developer.get("/v1/jobs").json()["items"] == []


def test_an_unknown_vendor_is_refused(developer: Any) -> None:
    response = developer.post("/v1/jobs", json=job_body(vendors=["nvidai"]))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "body.vendors"
    assert "nvidia" in response.json()["error"]["message"]


def test_a_model_outside_the_catalog_that_is_on_offer_may_be_bid_for(
    db: Session, client_for: ClientFactory, developer: Any
) -> None:
    provider = signed_in(db, client_for, Role.provider)
    homemade = offer_body(
        accelerator="garage-npu",
        vendor="other",
        platform="cpu",
        memory_gib=16,
        tflops_bf16=1,
        tflops_fp32=1,
        mem_bw_gbps=50,
    )
    assert provider.post("/v1/offers", json=homemade).status_code == 201
    response = developer.post("/v1/jobs", json=job_body(accelerator_models=["Garage NPU"]))
    assert response.status_code == 201, response.text
    assert response.json()["accelerator_models"] == ["garage-npu"]


def test_a_matched_bid_without_a_program_fails_at_once_with_the_reason(
    live_url: str, fresh_engine: Engine
) -> None:
    with transaction(fresh_engine) as session:
        _, dev_key = make_account(session, Role.developer)
        _, prov_key = make_account(session, Role.provider)
    with (
        ProviderClient(live_url, prov_key, retries=1) as provider,
        Connection(live_url, dev_key, retries=1) as developer,
    ):
        offer = provider.http.json(
            "POST", "/v1/offers", json=offer_body(accelerator="cpu-core", count=2)
        )
        job = developer.http.json("POST", "/v1/jobs", json=job_body(platforms=["cpu"]))
        run_round(fresh_engine, get_settings(), "manual")
        orders = provider.work()
        assert [order["job_id"] for order in orders] == [job["id"]]
        assert run_allocation(provider, orders[0]) == "failed"
        ended = developer.http.json("GET", f"/v1/jobs/{job['id']}")
        assert ended["state"] == "failed"
        assert "no program to run" in ended["error"]
        (run,) = developer.http.json("GET", f"/v1/jobs/{job['id']}/runs")
        assert run["status"] == "finished"
        assert "no program to run" in run["end_reason"]
        assert (run["accelerator"], run["region"], run["node"]) == (
            "cpu",
            "europe-west4",
            None,
        )
        # The hardware is free again for the next bid.
        assert provider.http.json("GET", f"/v1/offers/{offer['id']}")["count"] == 2
