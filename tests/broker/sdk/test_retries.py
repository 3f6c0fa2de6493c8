"""Reports that fail with a 500 or a dropped connection are retried, and the run finishes."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from broker.config import get_settings
from broker.db import transaction
from broker.market.clearing import run_round
from broker.models.account import Role
from broker.sdk import Client, ProviderClient, run_allocation
from broker.sdk.http import BrokerError, BrokerUnavailable, Http
from tests.broker.portable.programs import sgd_args, sgd_step
from tests.factories import make_account, offer_body


class Flaky(httpx.BaseTransport):
    """Answers the first ``failures`` requests to each path ending in one of ``ends``
    with a 500 (or drops the connection), then lets them through."""

    def __init__(self, ends: tuple[str, ...], failures: int, *, drop: bool = False) -> None:
        self.inner = httpx.HTTPTransport()
        self.ends, self.failures, self.drop = ends, failures, drop
        self.failed: Counter[str] = Counter()
        self.passed: Counter[str] = Counter()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        end = next((e for e in self.ends if request.url.path.endswith(e)), None)
        if end is not None and self.failed[end] < self.failures:
            self.failed[end] += 1
            if self.drop:
                raise httpx.RemoteProtocolError("server disconnected", request=request)
            return httpx.Response(500, json={"error": {"code": "internal", "message": "boom"}})
        if end is not None:
            self.passed[end] += 1
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("drop", [False, True], ids=["500", "dropped"])
def test_reports_failing_a_few_times_are_retried_and_the_run_finishes(
    live_url: str, fresh_engine: Engine, drop: bool
) -> None:
    with transaction(fresh_engine) as session:
        _, dev_key = make_account(session, Role.developer)
        _, prov_key = make_account(session, Role.provider)
    flaky = Flaky(("/start", "/progress", "/checkpoint", "/finish"), 2, drop=drop)
    provider = ProviderClient(live_url, prov_key, backoff=0.01, transport=flaky)
    developer = Client(live_url, dev_key, retries=1)
    try:
        provider.http.json(
            "POST",
            "/v1/offers",
            json=offer_body(accelerator="cpu", count=1, price_per_hour="0.10"),
        )
        state, x, y = sgd_args()
        job = developer.submit(
            sgd_step, state, x, y, steps=40, checkpoint_every=10, max_price_per_hour=1.0
        )
        run_round(fresh_engine, get_settings(), "manual")
        (order,) = provider.work()
        assert run_allocation(provider, order, progress_seconds=0.0) == "succeeded"
        # The run's private directory is gone.
        left = Path(tempfile.gettempdir()).glob(f"broker-run-{order['allocation_id']}-*")
        assert not list(left)
        job.wait(timeout=30, poll=0.05, progress=False)
        assert job.data["steps_done"] == 40
        assert job.data["attempts"] == 1  # never handed back
        for end in ("/start", "/checkpoint", "/finish"):
            assert flaky.failed[end] == 2
            assert flaky.passed[end] >= 1
    finally:
        provider.close()
        developer.close()


def test_retries_go_on_for_at_least_retry_seconds() -> None:
    calls: list[float] = []

    def always_500(request: httpx.Request) -> httpx.Response:
        import time

        calls.append(time.monotonic())
        return httpx.Response(500, json={"error": {"code": "internal", "message": "down"}})

    http = Http(
        "http://broker.test",
        "key",
        retries=1,
        backoff=0.01,
        retry_seconds=0.3,
        transport=httpx.MockTransport(always_500),
    )
    with pytest.raises(BrokerError) as raised:
        http.request("GET", "/v1/jobs")
    assert raised.value.status == 500
    assert not isinstance(raised.value, BrokerUnavailable)
    assert calls[-1] - calls[0] >= 0.3
    assert len(calls) > 2
