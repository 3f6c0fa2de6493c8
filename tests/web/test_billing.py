"""Invoices, earnings and the fee in the dashboard, from the billing services."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.db import utcnow
from broker.models.account import Role
from broker.models.billing import Invoice, InvoiceLine
from tests.factories import make_job, make_offer, make_run
from tests.web.conftest import Browser


def _finished_run(db: Session, developer: Browser, provider: Browser, hours: float = 2.0) -> Any:
    offer = make_offer(db, provider.account, price_per_hour="2.50")
    job = make_job(db, developer.account, name="billed-job")
    return make_run(db, job, offer, int(hours * 3_600_000), fee_ppm=50_000, ended_at=utcnow())


def test_a_developer_invoices_finished_runs_and_reads_the_invoice(
    db: Session, browser_for: Any
) -> None:
    developer: Browser = browser_for(Role.developer)
    provider: Browser = browser_for(Role.provider)
    run = _finished_run(db, developer, provider)
    run.energy_kwh, run.gco2 = 1.54, 616.0  # estimated at match, for runtime_hours = 1
    assert "No invoices yet." in developer.get("/invoices").text
    made = developer.post("/invoices/generate")
    assert made.status_code == 303
    assert made.headers["location"] == "/invoices?made=1"
    listing = developer.get(made.headers["location"]).text
    assert "1 new invoice." in listing
    invoice = db.scalars(select(Invoice)).one()
    row = re.search(rf'data-invoice="{invoice.id}">.*?</tr>', listing, re.S)
    assert row
    assert "$5.00" in row.group(0)  # 2 h x $2.50
    assert "$0.25" in row.group(0)  # the 5 % fee
    assert "$5.25" in row.group(0)
    assert "open" in row.group(0)  # no Stripe: finalized at once
    again = developer.post("/invoices/generate")
    assert again.headers["location"] == "/invoices?made=0"  # a run is billed once

    detail = developer.get(f"/invoices/{invoice.id}").text
    assert run.job_id in detail
    assert "2 accelerator-h" in detail
    assert "$2.50/h" in detail
    assert "5 %" in detail
    assert re.search(r'data-testid="total"><strong>\$5.25</strong>', detail)
    # The 2 h metered on the 1 h estimate: twice its energy and carbon.
    assert "3.08 kWh" in detail
    assert "1.2 kg CO2e" in detail
    estimated = re.search(r'data-testid="line-carbon">.*?</td>', detail, re.S)
    assert estimated
    assert "estimated" in estimated.group(0)
    assert "Pay with Stripe" not in detail

    # With Stripe, the invoice carries the page where it is paid.
    invoice.hosted_invoice_url = "https://invoice.stripe.com/i/acct_1/test_abc"
    db.flush()
    paid = developer.get(f"/invoices/{invoice.id}").text
    assert 'href="https://invoice.stripe.com/i/acct_1/test_abc"' in paid


def test_a_measured_run_is_billed_its_measured_energy(db: Session, browser_for: Any) -> None:
    developer: Browser = browser_for(Role.developer)
    provider: Browser = browser_for(Role.provider)
    run = _finished_run(db, developer, provider)
    run.energy_kwh, run.gco2 = 1.54, 616.0  # the estimate: not what the line shows
    run.measured_kwh, run.measured_gco2 = 0.75, 300.0  # what the agent measured (x PUE)
    developer.post("/invoices/generate")
    invoice = db.scalars(select(Invoice)).one()
    detail = developer.get(f"/invoices/{invoice.id}").text
    cell = re.search(r'data-testid="line-carbon">.*?</td>', detail, re.S)
    assert cell
    assert "0.75 kWh" in cell.group(0)
    assert "300 g CO2e" in cell.group(0)
    assert "measured" in cell.group(0)
    line = db.scalars(select(InvoiceLine)).one()
    assert (line.energy_kwh, line.gco2, line.energy_basis) == (0.75, 300.0, "measured")


def test_invoices_are_the_developers_own(db: Session, browser_for: Any) -> None:
    alice: Browser = browser_for(Role.developer)
    bob: Browser = browser_for(Role.developer)
    provider: Browser = browser_for(Role.provider)
    admin: Browser = browser_for(Role.admin)
    _finished_run(db, alice, provider)
    alice.post("/invoices/generate")
    invoice = db.scalars(select(Invoice)).one()
    assert invoice.id in alice.get("/invoices").text
    assert invoice.id not in bob.get("/invoices").text
    assert bob.get(f"/invoices/{invoice.id}").status_code == 404
    assert bob.post("/invoices/generate").headers["location"] == "/invoices?made=0"
    assert provider.get("/invoices").status_code == 403  # providers have earnings instead
    assert invoice.id in admin.get("/invoices").text
    assert admin.get(f"/invoices/{invoice.id}").status_code == 200


def test_a_provider_reads_its_earnings(db: Session, browser_for: Any) -> None:
    developer: Browser = browser_for(Role.developer)
    provider: Browser = browser_for(Role.provider)
    other: Browser = browser_for(Role.provider)
    run = _finished_run(db, developer, provider, hours=3)
    page = provider.get("/earnings").text
    assert run.offer_id in page
    assert "listed by hand" in page
    assert re.search(r'data-testid="earned"><strong>\$7.50</strong>', page)  # no fee deducted
    assert run.offer_id not in other.get("/earnings").text
    assert developer.get("/earnings").status_code == 403
    assert provider.get("/earnings?start=2020-01-01&end=2020-01-31").status_code == 200
    assert "No runs ended" in provider.get("/earnings?start=2020-01-01&end=2020-01-31").text
    assert provider.get("/earnings?start=2020-02-01&end=2020-01-01").status_code == 422
    assert provider.get("/earnings?start=yesterday").status_code == 422


def test_jobs_show_locked_price_estimate_and_metered_cost(db: Session, browser_for: Any) -> None:
    developer: Browser = browser_for(Role.developer)
    provider: Browser = browser_for(Role.provider)
    run = _finished_run(db, developer, provider)
    listing = developer.get("/jobs").text
    row = re.search(rf'data-job="{run.job_id}">.*?</tr>', listing, re.S)
    assert row
    assert "$2.50/h" in row.group(0)  # the locked ask
    assert "+5 % fee" in row.group(0)
    assert "$2.625" in row.group(0)  # estimated compute, 1 h x $2.50, fee included
    assert "$5.25" in row.group(0)  # metered: 2 h x $2.50 + 5 %


def test_an_admin_sets_the_fee(db: Session, browser_for: Any) -> None:
    admin: Browser = browser_for(Role.admin)
    developer: Browser = browser_for(Role.developer)
    assert re.search(r'data-testid="fee">5 %<', admin.get("/admin").text)  # the default
    changed = admin.post("/admin/fee", {"percent": "7.5"})
    assert changed.status_code == 303
    page = admin.get(changed.headers["location"]).text
    assert "The fee is now 7.5 %" in page
    refused = admin.post("/admin/fee", {"percent": "150"})
    assert refused.status_code == 422
    assert "less than or equal to 100" in refused.text
    assert developer.post("/admin/fee", {"percent": "0"}).status_code == 403
    assert re.search(r'data-testid="fee">7.5 %<', admin.get("/admin").text)
