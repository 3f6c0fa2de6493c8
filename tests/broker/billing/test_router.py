"""The billing API: who sees which invoice, admin actions, the fee, statements."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from broker.models.account import Role
from broker.models.node import Node, NodeStatus
from tests.conftest import ClientFactory, signed_in
from tests.factories import make_job, make_offer, make_run

ENDED = datetime(2026, 3, 2, tzinfo=UTC)


def _billed(db: Session, developer: Any, provider: Any, hours: float = 1.0) -> dict[str, Any]:
    offer = make_offer(db, provider.account, price_per_hour="2.00")
    make_run(db, make_job(db, developer.account), offer, int(hours * 3_600_000), ended_at=ENDED)
    answer = developer.post("/v1/invoices/generate", json={})
    assert answer.status_code == 200, answer.text
    (invoice,) = answer.json()["invoices"]
    return dict(invoice)


def test_a_developer_sees_its_own_invoices_only(db: Session, client_for: ClientFactory) -> None:
    alice = signed_in(db, client_for, Role.developer)
    bob = signed_in(db, client_for, Role.developer)
    provider = signed_in(db, client_for, Role.provider)
    mine = _billed(db, alice, provider)
    assert (mine["subtotal"], mine["fee"], mine["total"]) == ("2.00", "0.00", "2.00")
    assert mine["status"] == "open"

    assert [i["id"] for i in alice.get("/v1/invoices").json()["items"]] == [mine["id"]]
    assert bob.get("/v1/invoices").json()["items"] == []
    assert bob.get(f"/v1/invoices/{mine['id']}").status_code == 404
    assert provider.get("/v1/invoices").status_code == 403
    assert "statements" in provider.get("/v1/invoices").json()["error"]["message"]
    assert client_for(None).get("/v1/invoices").status_code == 401

    detail = alice.get(f"/v1/invoices/{mine['id']}").json()
    (line,) = detail["lines"]
    assert line["accelerator_hours"] == "1.000000"
    assert line["rate_per_hour"] == "2.00"
    assert line["amount"] == "2.00"
    assert detail["fee_percent"] is not None


def test_an_admin_marks_an_invoice_paid_or_void(db: Session, client_for: ClientFactory) -> None:
    developer = signed_in(db, client_for, Role.developer)
    provider = signed_in(db, client_for, Role.provider)
    admin = signed_in(db, client_for, Role.admin)
    first = _billed(db, developer, provider)
    assert developer.post(f"/v1/invoices/{first['id']}/pay").status_code == 403
    paid = admin.post(f"/v1/invoices/{first['id']}/pay")
    assert paid.status_code == 200
    assert paid.json()["status"] == "paid"
    assert admin.post(f"/v1/invoices/{first['id']}/pay").json()["status"] == "paid"  # a retry
    refused = admin.post(f"/v1/invoices/{first['id']}/void")
    assert refused.status_code == 409
    assert "refund" in refused.json()["error"]["message"]

    second = _billed(db, developer, provider, hours=0.5)
    assert admin.post(f"/v1/invoices/{second['id']}/void").json()["status"] == "void"
    assert admin.post(f"/v1/invoices/{second['id']}/pay").status_code == 409
    everyone = admin.get("/v1/invoices", params={"account_id": developer.account.id}).json()
    assert {i["status"] for i in everyone["items"]} == {"paid", "void"}
    # Voided runs are never billed again.
    assert developer.post("/v1/invoices/generate", json={}).json()["invoices"] == []


def test_the_fee_is_read_by_anyone_and_set_by_admins(
    db: Session, client_for: ClientFactory
) -> None:
    developer = signed_in(db, client_for, Role.developer)
    admin = signed_in(db, client_for, Role.admin)
    assert developer.get("/v1/billing/fee").json()["percent"] == "5"
    assert developer.put("/v1/billing/fee", json={"percent": "1"}).status_code == 403
    for bad in ("-1", "100.5", "0.00001", "ten"):
        answer = admin.put("/v1/billing/fee", json={"percent": bad})
        assert answer.status_code == 422, bad
    assert admin.put("/v1/billing/fee", json={"percent": "7.25"}).json()["percent"] == "7.25"
    fee = developer.get("/v1/billing/fee").json()
    assert fee["percent"] == "7.25"
    assert fee["set_by"] == admin.account.id


def test_a_provider_statement_shows_earnings_by_node_and_offer(
    db: Session, client_for: ClientFactory
) -> None:
    developer = signed_in(db, client_for, Role.developer)
    provider = signed_in(db, client_for, Role.provider)
    other = signed_in(db, client_for, Role.provider)
    node = Node(
        id="nod_statement",
        provider_id=provider.account.id,
        name="rack-1",
        status=NodeStatus.online,
        adapters=["cpu"],
        region="europe-west4",
        country="NL",
        lat=53.4,
        lon=6.8,
        devices=[],
        last_heartbeat_at=ENDED,
        created_at=ENDED,
        updated_at=ENDED,
    )
    db.add(node)
    by_hand = make_offer(db, provider.account, price_per_hour="2.00")
    agent = make_offer(db, provider.account, price_per_hour="3.00")
    agent.node_id = node.id
    for offer, ms, fee in (
        (by_hand, 1_800_000, 50_000),
        (agent, 3_600_000, 0),
        (agent, 600_000, 0),
    ):
        make_run(db, make_job(db, developer.account), offer, ms, fee_ppm=fee, ended_at=ENDED)
    window = {
        "start": (ENDED - timedelta(days=1)).isoformat(),
        "end": (ENDED + timedelta(days=1)).isoformat(),
    }

    mine = provider.get("/v1/statements", params=window)
    assert mine.status_code == 200, mine.text
    rows = {r["offer_id"]: r for r in mine.json()["rows"]}
    # The fee is the developer's to pay: the provider earns its full ask.
    assert rows[by_hand.id]["amount"] == "1.00"
    assert rows[by_hand.id]["node_name"] is None
    assert rows[agent.id]["amount"] == "3.50"
    assert (rows[agent.id]["node_name"], rows[agent.id]["runs"]) == ("rack-1", 2)
    assert mine.json()["total"] == "4.50"

    assert other.get("/v1/statements", params=window).json()["rows"] == []
    assert (
        other.get(
            "/v1/statements", params={**window, "provider_id": provider.account.id}
        ).status_code
        == 403
    )
    assert developer.get("/v1/statements").status_code == 403
    backwards = provider.get(
        "/v1/statements", params={"start": window["end"], "end": window["start"]}
    )
    assert backwards.status_code == 422


def test_jobs_show_their_locked_price_and_metered_cost(
    db: Session, client_for: ClientFactory
) -> None:
    developer = signed_in(db, client_for, Role.developer)
    provider = signed_in(db, client_for, Role.provider)
    offer = make_offer(db, provider.account, price_per_hour="2.00")
    job = make_job(db, developer.account, budget_usd="9.50")
    make_run(db, job, offer, 1_800_000, fee_ppm=100_000, ended_at=ENDED)
    shown = developer.get(f"/v1/jobs/{job.id}").json()
    assert shown["budget_usd"] == "9.50"
    assert shown["price_per_hour"] == "2.00"
    assert shown["fee_percent"] == "10"
    assert shown["accelerator_seconds"] == 1800.0
    assert shown["cost_usd"] == "1.10"  # half an hour at $2.00, plus 10 %
    listed = developer.get("/v1/jobs").json()["items"]
    assert [j["cost_usd"] for j in listed] == ["1.10"]
    refused = developer.post(
        "/v1/jobs",
        json={
            "platforms": ["cpu"],
            "max_price_per_hour": "1",
            "duration_hours": 1,
            "budget_usd": "0",
        },
    )
    assert refused.status_code == 422
    assert refused.json()["error"]["field"] == "body.budget_usd"
