"""What an offer draws and emits: stated by its provider, or the defaults (the
model's TDP, the site's PUE, the grid of its region or country); clearing uses
them (docs/market.md)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from adapters import grid
from broker.config import Settings
from broker.db import transaction
from broker.market import clearing
from broker.market.adapt import weights
from broker.market.standing import Standing
from broker.models.account import Role
from broker.models.market import Allocation
from tests.broker.market.test_clearing import accounts, seed
from tests.conftest import ClientFactory, signed_in
from tests.factories import make_job, make_offer, offer_body


@pytest.fixture
def provider(db: Session, client_for: ClientFactory) -> Any:
    return signed_in(db, client_for, Role.provider)


def _book(db: Session) -> dict[str, Any]:
    book, _ = Standing().read(db, weights(Settings(fee_percent=Decimal(0)), 0))
    return {o.id: o for o in book.offers}


def test_an_offer_without_figures_takes_the_defaults(provider: Any, db: Session) -> None:
    answer = provider.post("/v1/offers", json=offer_body(accelerator="h100-sxm", country="SE"))
    assert answer.status_code == 201, answer.text
    offer = answer.json()
    assert (offer["power_w"], offer["pue"], offer["grid_g_per_kwh"]) == (None, None, None)
    seen = _book(db)[offer["id"]]
    assert seen.power_w == 700.0  # the H100 SXM's datasheet TDP
    assert seen.pue == grid.PUE_BY_SITE["colocation"]
    assert seen.grid_g_per_kwh == grid.intensity("SE").g_co2e_per_kwh


def test_stated_figures_are_kept_and_used(provider: Any, db: Session) -> None:
    body = offer_body(accelerator="h100-sxm", power_w=350, pue=1.1, grid_g_per_kwh=12)
    offer = provider.post("/v1/offers", json=body).json()
    assert (offer["power_w"], offer["pue"], offer["grid_g_per_kwh"]) == (350, 1.1, 12)
    seen = _book(db)[offer["id"]]
    assert (seen.power_w, seen.pue, seen.grid_g_per_kwh) == (350, 1.1, 12)


@pytest.mark.parametrize(
    ("claims", "field"),
    [
        ({"power_w": 100}, "power_w"),  # under 30 % of 700 W: would look clean
        ({"power_w": 900}, "power_w"),  # over the datasheet
        ({"pue": 0.8}, "pue"),  # no site uses less than its IT equipment
        ({"grid_g_per_kwh": -1}, "grid_g_per_kwh"),
    ],
)
def test_implausible_figures_are_refused(provider: Any, claims: dict[str, Any], field: str) -> None:
    answer = provider.post("/v1/offers", json=offer_body(accelerator="h100-sxm", **claims))
    assert answer.status_code == 422, answer.text
    assert field in answer.text


def test_a_match_records_its_energy_and_carbon(fresh_engine: Engine) -> None:
    """Cleared with a carbon price, the clean offer wins and the allocation carries
    the estimate: kW x PUE x accelerators x hours, times the grid's intensity."""
    provider, developer = accounts(fresh_engine)
    dirty = seed(
        fresh_engine,
        lambda s: make_offer(s, provider, price_per_hour="2.00", grid_g_per_kwh=800, pue=1.2),
    )
    clean = seed(
        fresh_engine,
        lambda s: make_offer(s, provider, price_per_hour="2.10", grid_g_per_kwh=20, pue=1.2),
    )
    job = seed(fresh_engine, lambda s: make_job(s, developer, accelerators=2, duration_hours=3))
    settings = Settings(
        clear_time_limit_seconds=5, fee_percent=Decimal(0), carbon_usd_per_t=Decimal(500)
    )
    record = clearing.run_round(fresh_engine, settings)
    assert record is not None
    assert record.matched == 1
    with transaction(fresh_engine, write=False) as s:
        allocation = s.scalars(select(Allocation).where(Allocation.job_id == job.id)).one()
        assert allocation.offer_id == clean.id != dirty.id
        assert allocation.energy_kwh == pytest.approx(0.7 * 1.2 * 2 * 3)
        assert allocation.gco2 == pytest.approx(0.7 * 1.2 * 2 * 3 * 20)
        # What the developer pays is the ask; the carbon price only chose the offer.
        assert allocation.cost_micros == 2_100_000 * 2 * 3


def test_a_job_sets_its_carbon_cap_and_price(db: Session, client_for: ClientFactory) -> None:
    from tests.factories import job_body, make_account

    _, key = make_account(db, Role.developer)
    body = job_body(max_gco2=1500, carbon_usd_per_t=200)
    answer = client_for(key).post("/v1/jobs", json=body)
    assert answer.status_code == 201, answer.text
    job = answer.json()
    assert (job["max_gco2"], job["carbon_usd_per_t"]) == (1500, 200)
    book, _ = Standing().read(db, weights(Settings(fee_percent=Decimal(0)), 0))
    (seen,) = [j for j in book.jobs if j.id == job["id"]]
    assert (seen.max_gco2, seen.carbon_usd_per_t) == (1500, 200)
    refused = client_for(key).post("/v1/jobs", json=job_body(max_gco2=-1))
    assert refused.status_code == 422
    assert "max_gco2" in refused.text


def test_a_developer_sees_its_carbon_by_month(db: Session, client_for: ClientFactory) -> None:
    from broker.db import utcnow
    from tests.factories import make_account, make_run

    provider, _ = make_account(db, Role.provider)
    developer, key = make_account(db, Role.developer)
    other, _ = make_account(db, Role.developer)
    offer = make_offer(db, provider)
    for owner, gco2 in ((developer, 100.0), (developer, 50.0), (other, 999.0)):
        run = make_run(db, make_job(db, owner), offer, 60_000, ended_at=utcnow())
        run.energy_kwh, run.gco2 = gco2 / 400, gco2
    db.flush()
    (month,) = client_for(key).get("/v1/carbon").json()
    assert month["period"] == utcnow().strftime("%Y-%m")
    assert (month["runs"], month["gco2"], month["basis"]) == (2, 150.0, "estimated")
    assert month["energy_kwh"] == pytest.approx(150.0 / 400)


def test_invoices_and_statements_carry_the_metered_footprint(db: Session) -> None:
    """The match estimated 2 accelerators for 1 h at 1.54 kWh and 616 g; the run was
    metered at 3 accelerator-hours, so its line carries 3/2 of the estimate."""
    from datetime import UTC, datetime, timedelta

    from broker.billing import invoices
    from broker.billing.statements import statement
    from broker.models.billing import InvoiceLine
    from tests.factories import make_account, make_run

    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    provider, _ = make_account(db, Role.provider)
    developer, _ = make_account(db, Role.developer)
    offer = make_offer(db, provider)
    run = make_run(db, make_job(db, developer, accelerators=2), offer, 3 * 3_600_000, ended_at=t0)
    run.runtime_hours, run.energy_kwh, run.gco2 = 1.0, 1.54, 616.0
    db.flush()
    (invoice,) = invoices.generate(
        db, period_start=t0 - timedelta(days=1), cutoff=t0 + timedelta(1)
    )
    (line,) = db.scalars(select(InvoiceLine).where(InvoiceLine.invoice_id == invoice.id))
    assert line.energy_kwh == pytest.approx(1.54 * 1.5)
    assert line.gco2 == pytest.approx(616.0 * 1.5)
    earned = statement(db, provider, None, t0 - timedelta(days=1), t0 + timedelta(days=1))
    (row,) = earned.rows
    assert row.energy_kwh == pytest.approx(1.54 * 1.5)
    assert row.gco2 == pytest.approx(616.0 * 1.5)
