"""Billing fixtures: Stripe settings, a local Stripe API, signed webhook events."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from broker.config import get_settings
from tests.broker.billing.stripe_server import FakeStripe, localstripe

WEBHOOK_SECRET = "whsec_test_secret"


@pytest.fixture(scope="session")
def stripe_api() -> Iterator[FakeStripe]:
    """localstripe in its own process, behind the front server for invoices."""
    with localstripe() as upstream, FakeStripe(upstream) as fake:
        yield fake


@pytest.fixture
def stripe_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The webhook secret set (Stripe's API itself not configured)."""
    monkeypatch.setenv("BROKER_STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
    get_settings.cache_clear()
    yield
    monkeypatch.delenv("BROKER_STRIPE_WEBHOOK_SECRET")
    get_settings.cache_clear()


@pytest.fixture
def with_stripe(
    stripe_api: FakeStripe, stripe_settings: None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeStripe]:
    """The broker configured to bill through the local Stripe API."""
    monkeypatch.setenv("BROKER_STRIPE_API_KEY", "sk_test_local")
    monkeypatch.setenv("BROKER_STRIPE_API_BASE", stripe_api.url)
    get_settings.cache_clear()
    yield stripe_api
    monkeypatch.delenv("BROKER_STRIPE_API_KEY")
    monkeypatch.delenv("BROKER_STRIPE_API_BASE")
    get_settings.cache_clear()


def signed(
    event: dict[str, Any], *, secret: str = WEBHOOK_SECRET, at: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """An event body and its Stripe-Signature header, as Stripe signs them."""
    payload = json.dumps(event).encode()
    timestamp = int(time.time()) if at is None else at
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256)
    header = f"t={timestamp},v1={digest.hexdigest()}"
    return payload, {"Stripe-Signature": header, "Content-Type": "application/json"}


def invoice_event(event_id: str, kind: str, invoice: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": event_id,
        "object": "event",
        "type": kind,
        "created": int(time.time()),
        "livemode": False,
        "api_version": "2026-10-28.endive",
        "data": {"object": invoice},
    }
