"""Stripe's copy of an invoice disagreeing with ours (an item added twice, an amount
edited on Stripe's side): compared before finalizing, held for an admin with the
reason, never opened, never sent; the webhook checks amounts too. Against the local
Stripe API (localstripe behind ``stripe_server``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine

from broker.billing import invoices, sync
from broker.config import get_settings
from broker.db import transaction
from broker.models.account import Role
from broker.models.billing import Invoice
from tests.broker.billing.conftest import invoice_event, signed
from tests.broker.billing.stripe_server import FakeStripe
from tests.broker.billing.test_stripe import _developer_with_runs
from tests.conftest import ClientFactory
from tests.factories import make_account


def _drafted(fake: FakeStripe, developer: Any) -> dict[str, Any]:
    """An invoice whose Stripe draft has its items but was not finalized yet (Stripe
    refused the first look at it)."""
    fake.fail_next("/v1/invoices/in_", 400)
    (summary,) = developer.post("/v1/invoices/generate", json={}).json()["invoices"]
    invoice: dict[str, Any] = developer.get(f"/v1/invoices/{summary['id']}").json()
    assert invoice["status"] == "draft"
    assert fake.invoices[invoice["stripe_invoice_id"]]["status"] == "draft"
    return invoice


def _billing_pass(engine: Engine) -> sync.PassReport:
    transactions = lambda write=True: transaction(engine, write=write)  # noqa: E731
    return sync.generate(transactions, get_settings(), period_end=False)


@pytest.mark.parametrize("change", ["duplicate", "amount"])
def test_a_stripe_copy_that_disagrees_is_held_not_finalized(
    fresh_engine: Engine, fresh_client_for: ClientFactory, with_stripe: FakeStripe, change: str
) -> None:
    fake = with_stripe
    developer = _developer_with_runs(fresh_engine, fresh_client_for, [3_600_000, 1_800_000])
    invoice = _drafted(fake, developer)
    stripe_id = invoice["stripe_invoice_id"]
    if change == "duplicate":
        fake.tamper(stripe_id, duplicate=True)
    else:
        fake.tamper(stripe_id, amount=1)

    report = _billing_pass(fresh_engine)
    assert report.synced == []
    assert "not finalized" in report.sync_errors[invoice["id"]]
    held = developer.get(f"/v1/invoices/{invoice['id']}").json()
    assert held["status"] == "held"
    assert stripe_id in held["hold_reason"]
    assert str(invoice["total"]).replace(".", "").lstrip("0") in held["hold_reason"]
    assert held["hosted_invoice_url"] is None
    assert fake.invoices[stripe_id]["status"] == "draft"  # never finalized, never sent

    # Later passes leave it alone; a late invoice.finalized event does not open it.
    finalize_calls = [p for m, p, _ in fake.requests if p.endswith("/finalize")]
    assert _billing_pass(fresh_engine).sync_errors == {}
    assert [p for m, p, _ in fake.requests if p.endswith("/finalize")] == finalize_calls
    event = {**fake.invoices[stripe_id], "status": "open", "hosted_invoice_url": "https://x"}
    body, headers = signed(invoice_event(f"evt_fin_{change}", "invoice.finalized", event))
    answer = fresh_client_for(None).post("/v1/stripe/webhook", content=body, headers=headers)
    assert answer.status_code == 200
    assert "held" in answer.json()["outcome"]
    assert developer.get(f"/v1/invoices/{invoice['id']}").json()["status"] == "held"

    # An admin voids it, here and on Stripe's side.
    with transaction(fresh_engine) as db:
        _, admin_key = make_account(db, Role.admin)
    admin = fresh_client_for(admin_key)
    voided = admin.post(f"/v1/invoices/{invoice['id']}/void")
    assert voided.status_code == 200, voided.text
    assert voided.json()["status"] == "void"
    assert fake.invoices[stripe_id]["status"] == "void"


def test_a_held_invoice_released_after_the_fix_is_opened(
    fresh_engine: Engine, fresh_client_for: ClientFactory, with_stripe: FakeStripe
) -> None:
    fake = with_stripe
    developer = _developer_with_runs(fresh_engine, fresh_client_for, [3_600_000])
    invoice = _drafted(fake, developer)
    stripe_id = invoice["stripe_invoice_id"]
    first = fake.invoices[stripe_id]["lines"]["data"][0]["amount"]
    fake.tamper(stripe_id, amount=first + 100)
    _billing_pass(fresh_engine)
    assert developer.get(f"/v1/invoices/{invoice['id']}").json()["status"] == "held"
    with transaction(fresh_engine) as db:
        _, admin_key = make_account(db, Role.admin)
    admin = fresh_client_for(admin_key)
    assert developer.post(f"/v1/invoices/{invoice['id']}/release").status_code == 403
    fake.tamper(stripe_id, amount=first)  # the admin fixes Stripe's draft
    released = admin.post(f"/v1/invoices/{invoice['id']}/release")
    assert released.status_code == 200
    assert released.json()["status"] == "draft"
    assert _billing_pass(fresh_engine).synced == [invoice["id"]]
    opened = developer.get(f"/v1/invoices/{invoice['id']}").json()
    assert opened["status"] == "open"
    assert opened["hold_reason"] is None
    assert fake.invoices[stripe_id]["status"] == "open"
    assert admin.post(f"/v1/invoices/{invoice['id']}/release").status_code == 409


def _invoice_in_stripe(engine: Engine, developer: Any, stripe_id: str, *, opened: bool) -> Any:
    """An invoice another process pushed to Stripe as ``stripe_id`` (a draft, or opened)."""
    with transaction(engine) as db:
        (row,) = invoices.generate(
            db,
            period_start=datetime(2026, 1, 1, tzinfo=UTC),
            cutoff=datetime(2026, 4, 1, tzinfo=UTC),
            account_id=developer.account.id,
            finalize=opened,
        )
        row.stripe_invoice_id = stripe_id
        return row.id, row.total_cents


def test_webhook_events_whose_amounts_disagree_hold_the_invoice(
    fresh_engine: Engine, fresh_client_for: ClientFactory, stripe_settings: None
) -> None:
    """Without Stripe's API configured here (another process syncs): an invoice.finalized
    event for a different amount does not open the draft, an invoice.paid event for
    less than the total does not mark it paid; events that agree do."""
    webhook = fresh_client_for(None)

    def send(event_id: str, kind: str, stripe_id: str, **fields: Any) -> str:
        obj = {"id": stripe_id, "object": "invoice", "currency": "usd", **fields}
        body, headers = signed(invoice_event(event_id, kind, obj))
        answer = webhook.post("/v1/stripe/webhook", content=body, headers=headers)
        assert answer.status_code == 200, answer.text
        outcome: str = answer.json()["outcome"]
        return outcome

    def status(invoice_id: str) -> tuple[str, str | None, str | None]:
        with transaction(fresh_engine, write=False) as db:
            row = db.get_one(Invoice, invoice_id)
            return row.status.value, row.hold_reason, row.hosted_invoice_url

    first = _developer_with_runs(fresh_engine, fresh_client_for, [3_600_000])
    draft, total = _invoice_in_stripe(fresh_engine, first, "in_elsewhere_1", opened=False)
    assert "held" in send("evt_a", "invoice.finalized", "in_elsewhere_1", amount_due=total + 1)
    state, reason, url = status(draft)
    assert (state, url) == ("held", None)
    assert f"{total + 1}" in (reason or "")

    second = _developer_with_runs(fresh_engine, fresh_client_for, [7_200_000])
    opened, total = _invoice_in_stripe(fresh_engine, second, "in_elsewhere_2", opened=True)
    assert status(opened)[0] == "open"
    outcome = send("evt_b", "invoice.paid", "in_elsewhere_2", amount_paid=total - 1)
    assert "held" in outcome
    assert status(opened)[0] == "held"  # an admin decides what was paid

    third = _developer_with_runs(fresh_engine, fresh_client_for, [1_800_000])
    fine, total = _invoice_in_stripe(fresh_engine, third, "in_elsewhere_3", opened=False)
    send("evt_c", "invoice.finalized", "in_elsewhere_3", amount_due=total, hosted_invoice_url="u")
    assert status(fine) == ("open", None, "u")
    send("evt_d", "invoice.paid", "in_elsewhere_3", amount_paid=total, amount_due=total)
    assert status(fine)[0] == "paid"
