"""The SDK refuses, before sending anything, what the broker or the backends would refuse."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import Engine

from broker.config import get_settings
from broker.db import transaction
from broker.models.account import Role
from broker.sdk import BrokerError, Client
from tests.factories import make_account


class Recording(httpx.HTTPTransport):
    """The real transport, noting each request's method and path."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path))
        return super().handle_request(request)


@pytest.fixture
def small_limits(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("BROKER_MAX_ARRAYS_BYTES", str(6_000_000))
    monkeypatch.setenv("BROKER_STORAGE_QUOTA_BYTES", str(20_000_000))
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


def test_too_large_inputs_are_refused_before_uploading(
    small_limits: None, live_url: str, fresh_engine: Engine
) -> None:
    with transaction(fresh_engine) as session:
        _, key = make_account(session, Role.developer)
    transport = Recording()
    with Client(live_url, key, retries=1, transport=transport) as client:
        big = np.zeros(2_000_000, dtype=np.float32)  # 8 MB
        with pytest.raises(BrokerError) as refused:
            client.upload_arrays([big])
        assert refused.value.status == 413
        assert refused.value.code == "upload_too_large"
        assert "8 MB" in refused.value.message
        assert "at most 6 MB" in refused.value.message
        assert ("POST", "/v1/arrays") not in transport.sent
        # Within the limit, but past the quota left once 3 such uploads are stored.
        for i in range(3):
            client.upload_arrays([np.full(1_250_000, i, dtype=np.float32)])  # 5 MB each
        with pytest.raises(BrokerError) as over:
            client.upload_arrays([np.full(1_250_000, 9, dtype=np.float32)])
        assert over.value.code == "storage_quota"
        assert "quota" in over.value.message
        assert transport.sent.count(("POST", "/v1/arrays")) == 3


def test_a_host_callback_is_refused_with_what_to_do() -> None:
    import jax

    from broker.sdk import ArtifactError

    def uses_a_callback(x: jax.Array) -> Any:
        shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return jax.pure_callback(lambda a: np.asarray(a) * 2, shape, x)

    # Refused while packaging, before any request (nothing listens on port 9).
    with (
        Client("http://127.0.0.1:9", "bk_unused", retries=0) as client,
        pytest.raises(ArtifactError, match=r"must be pure JAX: no jax\.pure_callback"),
    ):
        client.submit(uses_a_callback, np.ones(3, np.float32), max_price_per_hour=1.0)
