"""Stripe's webhook: verified, stored once, handled after the commit."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from broker.billing import invoices
from broker.db import transaction
from broker.models.account import Role
from broker.models.billing import Invoice, InvoiceStatus, StripeEvent
from tests.broker.billing.conftest import invoice_event, signed
from tests.conftest import ClientFactory
from tests.factories import make_account, make_job, make_offer, make_run

URL = "/v1/stripe/webhook"
T0 = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture
def stripe_invoice(fresh_engine: Engine, stripe_settings: None) -> dict[str, Any]:
    """An open invoice that Stripe collects, as Stripe describes it in events."""
    with transaction(fresh_engine) as db:
        developer, _ = make_account(db, Role.developer)
        provider, _ = make_account(db, Role.provider)
        make_run(db, make_job(db, developer), make_offer(db, provider), 3_600_000, ended_at=T0)
        (invoice,) = invoices.generate(db, period_start=T0, cutoff=T0 + timedelta(days=1))
        invoice.stripe_invoice_id = "in_test_1"
        invoice_id = invoice.id
    return {
        "id": "in_test_1",
        "object": "invoice",
        "status": "paid",
        "amount_due": 250,
        "attempt_count": 1,
        "metadata": {"broker_invoice_id": invoice_id},
        "status_transitions": {"paid_at": int(time.time())},
    }


def _status(engine: Engine, invoice_id: str) -> InvoiceStatus:
    with transaction(engine, write=False) as db:
        return db.get_one(Invoice, invoice_id).status


def _events(engine: Engine) -> int:
    with transaction(engine, write=False) as db:
        return db.scalar(select(func.count()).select_from(StripeEvent)) or 0


def test_a_signed_event_marks_the_invoice_paid_and_a_replay_does_nothing(
    fresh_engine: Engine, fresh_client_for: ClientFactory, stripe_invoice: dict[str, Any]
) -> None:
    ours = stripe_invoice["metadata"]["broker_invoice_id"]
    assert _status(fresh_engine, ours) == InvoiceStatus.open
    body, headers = signed(invoice_event("evt_1", "invoice.paid", stripe_invoice))
    first = fresh_client_for(None).post(URL, content=body, headers=headers)
    assert first.status_code == 200, first.text
    assert first.json() == {"received": True, "duplicate": False, "outcome": f"invoice {ours} paid"}
    assert _status(fresh_engine, ours) == InvoiceStatus.paid

    again = fresh_client_for(None).post(URL, content=body, headers=headers)
    assert again.status_code == 200
    assert again.json() == {"received": True, "duplicate": True}
    assert _events(fresh_engine) == 1


def test_a_failed_payment_leaves_the_invoice_open_and_a_late_one_never_unpays_it(
    fresh_engine: Engine, fresh_client_for: ClientFactory, stripe_invoice: dict[str, Any]
) -> None:
    ours = stripe_invoice["metadata"]["broker_invoice_id"]
    client = fresh_client_for(None)
    failed = {**stripe_invoice, "status": "open", "attempt_count": 2}
    answer = client.post(URL, **_req(invoice_event("evt_f", "invoice.payment_failed", failed)))
    assert answer.json()["outcome"] == f"invoice {ours} payment failed"
    with transaction(fresh_engine, write=False) as db:
        row = db.get_one(Invoice, ours)
        assert row.status == InvoiceStatus.open
        assert row.payment_error == "payment attempt 2 failed"
    client.post(URL, **_req(invoice_event("evt_p", "invoice.paid", stripe_invoice)))
    late = client.post(URL, **_req(invoice_event("evt_f2", "invoice.payment_failed", failed)))
    assert late.json()["outcome"] == f"invoice {ours} unchanged (paid)"
    assert _status(fresh_engine, ours) == InvoiceStatus.paid


def _req(event: dict[str, Any]) -> dict[str, Any]:
    body, headers = signed(event)
    return {"content": body, "headers": headers}


def test_a_bad_signature_is_refused_and_nothing_is_stored(
    fresh_engine: Engine, fresh_client_for: ClientFactory, stripe_invoice: dict[str, Any]
) -> None:
    body, headers = signed(
        invoice_event("evt_x", "invoice.paid", stripe_invoice), secret="whsec_wrong"
    )
    answer = fresh_client_for(None).post(URL, content=body, headers=headers)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "webhook_refused"
    assert "signature" in answer.json()["error"]["message"]
    # A body changed after signing fails the same way.
    body, headers = signed(invoice_event("evt_y", "invoice.paid", stripe_invoice))
    tampered = body.replace(b'"paid"', b'"void"')
    assert fresh_client_for(None).post(URL, content=tampered, headers=headers).status_code == 400
    assert fresh_client_for(None).post(URL, content=body).status_code == 400  # unsigned
    assert _events(fresh_engine) == 0
    assert _status(fresh_engine, stripe_invoice["metadata"]["broker_invoice_id"]) == "open"


def test_an_old_timestamp_is_refused(
    fresh_engine: Engine, fresh_client_for: ClientFactory, stripe_invoice: dict[str, Any]
) -> None:
    """A captured event replayed later than Stripe's five-minute tolerance."""
    event = invoice_event("evt_old", "invoice.paid", stripe_invoice)
    body, headers = signed(event, at=int(time.time()) - 600)
    answer = fresh_client_for(None).post(URL, content=body, headers=headers)
    assert answer.status_code == 400
    assert "timestamp" in answer.json()["error"]["message"].lower()
    assert _events(fresh_engine) == 0


def test_an_event_for_an_unknown_invoice_is_stored_and_ignored(
    fresh_engine: Engine, fresh_client_for: ClientFactory, stripe_settings: None
) -> None:
    stranger = {"id": "in_not_ours", "object": "invoice", "metadata": {}}
    answer = fresh_client_for(None).post(
        URL, **_req(invoice_event("evt_u", "invoice.paid", stranger))
    )
    assert answer.status_code == 200
    assert answer.json()["outcome"] == (
        "ignored: no invoice of this broker is Stripe invoice 'in_not_ours'"
    )
    assert _events(fresh_engine) == 1


def test_without_a_secret_the_endpoint_says_it_is_not_configured(
    fresh_client_for: ClientFactory,
) -> None:
    answer = fresh_client_for(None).post(URL, content=b"{}")
    assert answer.status_code == 404
    assert "BROKER_STRIPE_WEBHOOK_SECRET" in answer.json()["error"]["message"]
