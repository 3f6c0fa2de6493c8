"""An unmatched job hears the nearest figure on offer for each rule that rules it out,
and a bid no offer could hold stays out of the book's best bid."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session

from broker.models.account import Role
from tests.conftest import ClientFactory, signed_in
from tests.factories import job_body, offer_body


@pytest.fixture
def market(db: Session, client_for: ClientFactory) -> dict[str, Any]:
    provider = signed_in(db, client_for, Role.provider)
    for price, count in (("2.49", 8), ("3.10", 4)):
        listed = provider.post("/v1/offers", json=offer_body(price_per_hour=price, count=count))
        assert listed.status_code == 201, listed.text
    far = offer_body(price_per_hour="1.90", region="us-east-1", country="US", lat=38.9, lon=-77.4)
    assert provider.post("/v1/offers", json=far).status_code == 201
    return {"developer": signed_in(db, client_for, Role.developer)}


def _why(developer: Any, **body: Any) -> dict[str, Any]:
    job = developer.post("/v1/jobs", json=job_body(**body))
    assert job.status_code == 201, job.text
    unmatched: dict[str, Any] = developer.get(f"/v1/jobs/{job.json()['id']}").json()["unmatched"]
    return unmatched


def test_too_many_accelerators_names_the_largest_offer(market: dict[str, Any]) -> None:
    why = _why(market["developer"], accelerators=1000)
    assert why["feasible"] == 0
    assert why["nearest"]["capacity"] == (
        "the largest offer has 8 free accelerators; the job needs 1000 on one offer"
    )
    assert why["summary"].startswith("No offer passes every rule: too few free accelerators")
    assert "the largest offer has 8" in why["summary"]


def test_a_low_bid_names_the_cheapest_ask(market: dict[str, Any]) -> None:
    why = _why(market["developer"], max_price_per_hour="0.0001")
    assert why["nearest"]["price"] == "the cheapest ask is $1.90/h (h100-sxm); the bid is $0.0001/h"


def test_a_latency_target_names_the_nearest_region(market: dict[str, Any]) -> None:
    why = _why(market["developer"], user_lat=-33.9, user_lon=18.4, latency_slo_ms=20)
    nearest = why["nearest"]["latency"]
    assert nearest.startswith("the nearest offer, in europe-west4 (NL), is ")
    assert nearest.endswith("ms away; the target is 20 ms")


def test_an_unfillable_bid_never_makes_the_book_look_crossed(market: dict[str, Any]) -> None:
    developer = market["developer"]
    _why(developer, accelerators=1000, max_price_per_hour="50")
    _why(developer, accelerators=2, max_price_per_hour="2.00")
    (book,) = developer.get("/v1/market/book", params={"accelerator": "h100-sxm"}).json()["books"]
    assert book["largest_offer"] == 8
    assert book["best_bid"] == "2.00"
    assert book["best_ask"] == "1.90"
    assert book["spread"] is None  # 2.00 > 1.90: really crossed, by a bid that fits
    assert [(b["price_per_hour"], b["quantity"]) for b in book["bids"]] == [("2.00", 2)]
    assert [(b["price_per_hour"], b["quantity"]) for b in book["unfillable"]] == [("50.00", 1000)]


def test_without_the_fillable_bid_the_book_is_not_crossed(market: dict[str, Any]) -> None:
    developer = market["developer"]
    _why(developer, accelerators=1000, max_price_per_hour="50")
    (book,) = developer.get("/v1/market/book", params={"accelerator": "h100-sxm"}).json()["books"]
    assert book["best_bid"] is None
    assert book["spread"] is None
    assert book["unfillable"][0]["quantity"] == 1000
