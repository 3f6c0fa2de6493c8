"""Budgets: never matched above one, stopped when the metered cost reaches it."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from broker.billing import service as billing
from broker.config import get_settings
from broker.db import transaction, utcnow
from broker.market.clearing import run_round
from broker.models.account import Role
from broker.sdk import Client, ProviderClient, run_allocation
from tests.broker.portable.programs import sgd_args, sgd_step
from tests.conftest import ClientFactory
from tests.factories import make_account, make_job, make_offer, make_run, offer_body


def _client(engine: Engine, clients: ClientFactory, role: Role) -> Any:
    with transaction(engine) as session:
        account, key = make_account(session, role)
    client: Any = clients(key)
    client.account, client.key = account, key
    return client


def _clear(engine: Engine) -> None:
    run_round(engine, get_settings(), "manual")


def test_a_job_is_never_matched_where_its_estimate_exceeds_its_budget(
    fresh_engine: Engine, fresh_client_for: ClientFactory
) -> None:
    developer = _client(fresh_engine, fresh_client_for, Role.developer)
    provider = _client(fresh_engine, fresh_client_for, Role.provider)
    admin = _client(fresh_engine, fresh_client_for, Role.admin)
    assert provider.post("/v1/offers", json=offer_body(price_per_hour="3.00")).status_code == 201
    # 2 h at $3.00 = $6.00, plus the default 5 % fee = $6.30: over a $6.20 budget.
    job = developer.post(
        "/v1/jobs",
        json={
            "platforms": ["cuda"],
            "max_price_per_hour": "3.00",
            "duration_hours": 2,
            "budget_usd": "6.20",
        },
    ).json()
    assert job["budget_usd"] == "6.20"
    _clear(fresh_engine)
    detail = developer.get(f"/v1/jobs/{job['id']}").json()
    assert detail["state"] == "open"
    assert detail["unmatched"]["ruled_out"]["budget"] == 1
    assert "budget_usd" in detail["unmatched"]["summary"]

    # At a 2.5 % fee the estimate is $6.15: within the budget.
    assert admin.put("/v1/billing/fee", json={"percent": "2.5"}).status_code == 200
    _clear(fresh_engine)
    detail = developer.get(f"/v1/jobs/{job['id']}").json()
    assert detail["state"] == "matched"
    assert detail["price_per_hour"] == "3.00"
    assert Decimal(detail["fee_percent"]) == Decimal("2.5")
    assert detail["estimated_cost_usd"] == "6.15"
    assert detail["cost_usd"] == "0.00"


def test_the_metered_cost_stops_a_job_at_its_budget(
    fresh_engine: Engine, fresh_client_for: ClientFactory
) -> None:
    """$36,000 an hour is a cent every millisecond: a 5-cent budget lasts about 5 ms."""
    developer = _client(fresh_engine, fresh_client_for, Role.developer)
    provider = _client(fresh_engine, fresh_client_for, Role.provider)
    provider.post("/v1/offers", json=offer_body(price_per_hour="36000", count=1))
    job = developer.post(
        "/v1/jobs",
        json={
            "platforms": ["cuda"],
            "max_price_per_hour": "36000",
            "duration_hours": 0.000001,
            "budget_usd": "0.05",
        },
    ).json()
    _clear(fresh_engine)
    (order,) = provider.get("/v1/allocations").json()
    # 5 cents at $10.50 a second (5 % fee included): 4.761 ms.
    assert order["usage_limit_seconds"] == 0.004
    alloc = order["allocation_id"]
    assert provider.post(f"/v1/allocations/{alloc}/start").status_code == 200
    time.sleep(0.05)
    report = provider.post(
        f"/v1/allocations/{alloc}/progress", json={"steps_done": 0, "accelerator_seconds": 1.0}
    )
    assert report.status_code == 200, report.text
    stopped = developer.get(f"/v1/jobs/{job['id']}").json()
    assert stopped["state"] == "failed"
    assert "reached its budget of $0.05" in stopped["error"]
    assert stopped["accelerator_seconds"] == 0.004  # capped where the budget ran out
    assert Decimal(stopped["cost_usd"]) <= Decimal("0.05")
    # The provider is told to stop; nothing more is billed.
    again = provider.post(
        f"/v1/allocations/{alloc}/progress", json={"steps_done": 0, "accelerator_seconds": 2.0}
    )
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "allocation_ended"
    # An agent that noticed the budget too and reports its run failed is answered as a
    # repeat of what already happened.
    failed = provider.post(
        f"/v1/allocations/{alloc}/finish",
        json={"outcome": "failed", "error": "the run used up the job's budget"},
    )
    assert failed.status_code == 200, failed.text
    assert failed.json()["state"] == "failed"
    assert "reached its budget" in failed.json()["error"]

    (invoice,) = developer.post("/v1/invoices/generate", json={}).json()["invoices"]
    assert Decimal(invoice["total"]) <= Decimal("0.05")
    assert invoice["total"] == "0.04"  # 4 ms at $10/s = $0.04, fee $0.002 -> $0.00


def test_a_budget_counts_what_earlier_runs_cost(db: Session) -> None:
    developer, _ = make_account(db, Role.developer)
    provider, _ = make_account(db, Role.provider)
    offer = make_offer(db, provider, price_per_hour="3.60")  # a tenth of a cent a second
    job = make_job(db, developer, budget_usd="1.00", max_price_per_hour="3.60")
    make_run(db, job, offer, 600_000, ended_at=utcnow())  # 10 min: $0.60
    second = make_run(db, job, offer, 0, ended_at=None)
    # $0.40 left buys 400 s at $3.60/h with no fee.
    assert billing.usage_cap_ms(db, second, job) == 400_000


def test_an_agent_stops_a_run_at_the_budget(live_url: str, fresh_engine: Engine) -> None:
    """The provider's runner stops between chunks of steps when the run's usage reaches
    the work order's limit, and the broker ends the job, over budget."""
    with transaction(fresh_engine) as session:
        _, dev_key = make_account(session, Role.developer)
        _, prov_key = make_account(session, Role.provider)
    with (
        Client(live_url, dev_key, retries=1) as developer,
        ProviderClient(live_url, prov_key, retries=1) as provider,
    ):
        _run_to_the_budget(fresh_engine, developer, provider)


def _run_to_the_budget(engine: Engine, developer: Client, provider: ProviderClient) -> None:
    provider.http.json(
        "POST",
        "/v1/offers",
        # Peak figures far above this CPU's, so the estimate fits the budget easily.
        json=offer_body(
            accelerator="cpu-core",
            vendor="cpu",
            platform="cpu",
            memory_gib=8,
            tflops_bf16=1000,
            tflops_fp32=1000,
            mem_bw_gbps=100_000,
            count=1,
            price_per_hour="36",
        ),
    )
    state, x, y = sgd_args()
    # $36/h is a cent a second: a 0.84-cent budget, less the 5 % fee, buys 0.8 s.
    job = developer.submit(
        sgd_step,
        state,
        x,
        y,
        steps=10_000_000,
        checkpoint_every=10_000_000,
        platforms=("cpu",),
        max_price_per_hour=36,
        budget_usd="0.0084",
    )
    _clear(engine)
    (order,) = provider.work()
    assert order["usage_limit_seconds"] == 0.8
    began = time.monotonic()
    assert run_allocation(provider, order) == "failed"
    assert time.monotonic() - began < 30
    done = job.refresh().data
    assert "reached its budget" in done["error"]
    assert done["accelerator_seconds"] <= 0.8
    assert Decimal(done["cost_usd"]) <= Decimal("0.0084")
    assert done["steps_done"] < 10_000_000
