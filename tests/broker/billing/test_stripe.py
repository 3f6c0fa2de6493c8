"""Invoices through Stripe's SDK, against a local Stripe API (localstripe and the
front server of ``stripe_server``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import Engine, select

from broker.billing import sync
from broker.config import get_settings
from broker.db import transaction
from broker.models.account import Role
from broker.models.billing import Invoice, InvoiceLine, InvoiceStatus, StripeCustomer
from tests.broker.billing.conftest import invoice_event, signed
from tests.broker.billing.stripe_server import _AUTH, FakeStripe
from tests.conftest import ClientFactory
from tests.factories import make_account, make_job, make_offer, make_run

ENDED = datetime(2026, 3, 2, tzinfo=UTC)


def _developer_with_runs(engine: Engine, clients: ClientFactory, hours: list[int]) -> Any:
    """A developer whose jobs ran for ``hours`` (in milliseconds) at $2.40/h, 5 % fee."""
    with transaction(engine) as db:
        developer, key = make_account(db, Role.developer)
        provider, _ = make_account(db, Role.provider)
        offer = make_offer(db, provider, price_per_hour="2.40")
        for ms in hours:
            make_run(db, make_job(db, developer), offer, ms, fee_ppm=50_000, ended_at=ENDED)
    client: Any = clients(key)
    client.account = developer
    return client


def _posts(fake: FakeStripe, path: str) -> list[str | None]:
    return [key for method, p, key in fake.requests if method == "POST" and p == path]


def test_an_invoice_goes_to_stripe_and_comes_back_paid(
    fresh_engine: Engine, fresh_client_for: ClientFactory, with_stripe: FakeStripe
) -> None:
    fake = with_stripe
    developer = _developer_with_runs(fresh_engine, fresh_client_for, [5_400_000, 600_000])
    made = developer.post("/v1/invoices/generate", json={})
    assert made.status_code == 200, made.text
    (summary,) = made.json()["invoices"]
    assert made.json()["synced"] == [summary["id"]]
    invoice = developer.get(f"/v1/invoices/{summary['id']}").json()
    # 1.5 h + 10 min at $2.40 = $3.60 + $0.40, fee 5 % = $0.20.
    assert (invoice["subtotal"], invoice["fee"], invoice["total"]) == ("4.00", "0.20", "4.20")
    assert invoice["status"] == "open"
    stripe_id = invoice["stripe_invoice_id"]
    assert invoice["hosted_invoice_url"] == f"{fake.url}/i/{stripe_id}"

    # Stripe's copy asks for the same cents, from items that localstripe stored.
    theirs = fake.invoices[stripe_id]
    assert theirs["status"] == "open"
    assert theirs["amount_due"] == 420
    assert theirs["metadata"] == {"broker_invoice_id": invoice["id"]}
    with transaction(fresh_engine, write=False) as db:
        lines = list(db.scalars(select(InvoiceLine).where(InvoiceLine.invoice_id == invoice["id"])))
        customer = db.get_one(StripeCustomer, developer.account.id).stripe_customer_id
    for line in lines:
        stored = httpx.get(f"{fake.upstream}/v1/invoiceitems/{line.stripe_item_id}", headers=_AUTH)
        assert stored.json()["amount"] == line.amount_cents
        assert stored.json()["customer"] == customer
    them = httpx.get(f"{fake.upstream}/v1/customers/{customer}", headers=_AUTH).json()
    assert them["metadata"] == {"broker_account_id": developer.account.id}
    # Every create carried an idempotency key.
    assert all(_posts(fake, "/v1/customers"))
    assert all(_posts(fake, "/v1/invoiceitems"))

    # Again: nothing new to bill, nothing new in Stripe.
    before = len(fake.requests)
    assert developer.post("/v1/invoices/generate", json={}).json()["invoices"] == []
    assert len(fake.requests) == before

    # The developer pays on Stripe's page; Stripe says so through the webhook.
    body, headers = signed(invoice_event("evt_paid_1", "invoice.paid", fake.pay(stripe_id)))
    answer = fresh_client_for(None).post("/v1/stripe/webhook", content=body, headers=headers)
    assert answer.json()["outcome"] == f"invoice {invoice['id']} paid"
    assert developer.get(f"/v1/invoices/{invoice['id']}").json()["status"] == "paid"


def test_a_sync_that_fails_half_way_resumes_without_duplicates(
    fresh_engine: Engine, fresh_client_for: ClientFactory, with_stripe: FakeStripe
) -> None:
    fake = with_stripe
    developer = _developer_with_runs(fresh_engine, fresh_client_for, [3_600_000, 7_200_000])
    items_before = len(_posts(fake, "/v1/invoiceitems"))
    fake.fail_next("/v1/invoices/in_", 400)  # Stripe refuses the finalize
    made = developer.post("/v1/invoices/generate", json={}).json()
    (summary,) = made["invoices"]
    assert summary["status"] == "draft"
    assert made["synced"] == []
    assert "Stripe" in made["sync_errors"][summary["id"]]
    draft = developer.get(f"/v1/invoices/{summary['id']}").json()
    assert draft["stripe_error"] is not None
    assert draft["hosted_invoice_url"] is None

    # The server's next billing pass picks it up where it stopped.
    transactions = lambda write=True: transaction(fresh_engine, write=write)  # noqa: E731
    report = sync.generate(transactions, get_settings(), period_end=False)
    assert report.invoices == []
    assert report.synced == [summary["id"]]
    done = developer.get(f"/v1/invoices/{summary['id']}").json()
    assert done["status"] == "open"
    assert done["stripe_error"] is None
    # Two lines and the fee: three items, each created once.
    assert len(_posts(fake, "/v1/invoiceitems")) - items_before == 3
    assert fake.invoices[done["stripe_invoice_id"]]["amount_due"] == 756  # $7.20 + 5 %


def test_a_dropped_connection_is_retried_with_the_same_idempotency_key(
    fresh_engine: Engine, fresh_client_for: ClientFactory, with_stripe: FakeStripe
) -> None:
    fake = with_stripe
    developer = _developer_with_runs(fresh_engine, fresh_client_for, [60_000])
    before = len(_posts(fake, "/v1/customers"))
    fake.fail_next("/v1/customers", 500)
    made = developer.post("/v1/invoices/generate", json={}).json()
    assert made["sync_errors"] == {}
    keys = _posts(fake, "/v1/customers")[before:]
    assert len(keys) == 2
    assert keys[0] == keys[1] == f"customer-{developer.account.id}"
    with transaction(fresh_engine, write=False) as db:
        (row,) = db.scalars(select(Invoice).where(Invoice.account_id == developer.account.id))
        assert row.status == InvoiceStatus.open


def test_an_admin_voids_an_invoice_in_stripe_too(
    fresh_engine: Engine, fresh_client_for: ClientFactory, with_stripe: FakeStripe
) -> None:
    developer = _developer_with_runs(fresh_engine, fresh_client_for, [3_600_000])
    with transaction(fresh_engine) as db:
        _, admin_key = make_account(db, Role.admin)
    admin = fresh_client_for(admin_key)
    (summary,) = developer.post("/v1/invoices/generate", json={}).json()["invoices"]
    invoice = developer.get(f"/v1/invoices/{summary['id']}").json()
    assert admin.post(f"/v1/invoices/{invoice['id']}/pay").status_code == 409  # Stripe collects
    voided = admin.post(f"/v1/invoices/{invoice['id']}/void")
    assert voided.status_code == 200, voided.text
    assert voided.json()["status"] == "void"
    assert with_stripe.invoices[invoice["stripe_invoice_id"]]["status"] == "void"
    # Stripe's own event about it changes nothing more.
    event = invoice_event(
        "evt_void_1", "invoice.voided", with_stripe.invoices[invoice["stripe_invoice_id"]]
    )
    body, headers = signed(event)
    answer = fresh_client_for(None).post("/v1/stripe/webhook", content=body, headers=headers)
    assert answer.json()["outcome"] == f"invoice {invoice['id']} unchanged (void)"
