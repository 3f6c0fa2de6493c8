from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session

from broker.accounts.models import Role
from tests.conftest import ClientFactory, signed_in
from tests.factories import make_account, make_offer, offer_body


@pytest.fixture
def provider(db: Session, client_for: ClientFactory) -> Any:
    return signed_in(db, client_for, Role.provider)


def test_offer_by_model_name_alone_is_filled_from_the_catalog(provider: Any) -> None:
    response = provider.post("/v1/offers", json=offer_body(accelerator="MI300X", count=4))
    assert response.status_code == 201, response.text
    offer = response.json()
    assert offer["id"].startswith("off_")
    assert offer["status"] == "active"
    assert (offer["accelerator"], offer["vendor"], offer["platform"]) == ("mi300x", "amd", "rocm")
    assert (offer["memory_gib"], offer["tflops_bf16"], offer["mem_bw_gbps"]) == (192, 1307.4, 5300)
    assert offer["efficiency"] == 0.4
    assert offer["price_per_hour"] == "2.50"


def test_explicit_figures_override_the_catalog(provider: Any) -> None:
    body = offer_body(accelerator="h100-sxm", tflops_bf16=800, efficiency=0.5)
    offer = provider.post("/v1/offers", json=body).json()
    assert (offer["tflops_bf16"], offer["tflops_fp32"], offer["efficiency"]) == (800, 67, 0.5)


def test_model_outside_the_catalog_needs_every_figure(provider: Any) -> None:
    missing = provider.post("/v1/offers", json=offer_body(accelerator="gaudi3", vendor="intel"))
    assert missing.status_code == 422
    assert missing.json()["error"]["field"] == "body.platform"
    assert "GET /v1/catalog" in missing.json()["error"]["message"]

    full = offer_body(
        accelerator="EPYC 9654",
        vendor="cpu",
        platform="cpu",
        memory_gib=384,
        tflops_bf16=5.4,
        tflops_fp32=5.4,
        mem_bw_gbps=460,
    )
    created = provider.post("/v1/offers", json=full)
    assert created.status_code == 201, created.text
    assert created.json()["accelerator"] == "epyc-9654"


def test_vendor_or_platform_contradicting_the_catalog_is_refused(provider: Any) -> None:
    response = provider.post("/v1/offers", json=offer_body(accelerator="h100-sxm", platform="rocm"))
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "body.platform"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"count": 0}, "body.count"),
        ({"price_per_hour": "2.1234567"}, "body.price_per_hour"),
        ({"price_per_hour": -1}, "body.price_per_hour"),
        ({"country": "nl"}, "body.country"),
        ({"lat": 91}, "body.lat"),
        ({"efficiency": 1.5}, "body.efficiency"),
        ({"platform": "metal"}, "body.platform"),
        ({"colour": "green"}, "body.colour"),
    ],
)
def test_bad_fields_are_named(provider: Any, change: dict[str, Any], field: str) -> None:
    response = provider.post("/v1/offers", json=offer_body(**change))
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["field"] == field


def test_malformed_json_is_a_clear_422(provider: Any) -> None:
    response = provider.post(
        "/v1/offers", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"


def test_developers_cannot_list_capacity(db: Session, client_for: ClientFactory) -> None:
    _, key = make_account(db, Role.developer)
    response = client_for(key).post("/v1/offers", json=offer_body())
    assert response.status_code == 403


def test_search_filters_sorts_and_pages(db: Session, client_for: ClientFactory) -> None:
    seller, _ = make_account(db, Role.provider)
    cheap = make_offer(db, seller, accelerator="h100-sxm", price_per_hour="1.90", count=2)
    dear = make_offer(
        db,
        seller,
        accelerator="h100-sxm",
        price_per_hour="3.20",
        count=8,
        region="us-east-1",
        country="US",
        lat=38.9,
        lon=-77.4,
    )
    amd = make_offer(db, seller, accelerator="mi300x", price_per_hour="2.40", count=8)
    tpu = make_offer(
        db,
        seller,
        accelerator="tpu-v5e",
        price_per_hour="1.20",
        count=8,
        region="us-central1",
        country="US",
        lat=41.3,
        lon=-95.9,
    )
    _, key = make_account(db, Role.developer)
    client = client_for(key)

    def ids(**params: Any) -> list[str]:
        response = client.get("/v1/offers", params={"limit": 200, **params})
        assert response.status_code == 200, response.text
        return [o["id"] for o in response.json()["items"]]

    assert ids() == [tpu.id, cheap.id, amd.id, dear.id]
    assert ids(sort="-price") == [dear.id, amd.id, cheap.id, tpu.id]
    assert ids(vendor="amd") == [amd.id]
    assert ids(accelerator="H100") == [cheap.id, dear.id]
    assert ids(platform="tpu") == [tpu.id]
    assert ids(min_memory_gib=100) == [amd.id]
    assert ids(min_count=8) == [tpu.id, amd.id, dear.id]
    assert ids(region="europe-west4") == [cheap.id, amd.id]
    assert ids(country="US") == [tpu.id, dear.id]
    assert ids(max_price="2.40") == [tpu.id, cheap.id, amd.id]
    assert ids(platform="cuda", max_price="2") == [cheap.id]

    page = client.get("/v1/offers", params={"limit": 2, "offset": 1}).json()
    assert [o["id"] for o in page["items"]] == [cheap.id, amd.id]
    assert (page["total"], page["limit"], page["offset"]) == (4, 2, 1)

    bad = client.get("/v1/offers", params={"limit": 0})
    assert bad.status_code == 422
    assert bad.json()["error"]["field"] == "query.limit"
    typo = client.get("/v1/offers", params={"max_prise": 3})
    assert typo.status_code == 422
    assert typo.json()["error"]["field"] == "query.max_prise"


def test_provider_updates_its_offer(provider: Any) -> None:
    offer = provider.post("/v1/offers", json=offer_body()).json()
    changed = provider.patch(
        f"/v1/offers/{offer['id']}", json={"price_per_hour": "2.19", "capacity": 3}
    )
    assert changed.status_code == 200, changed.text
    assert (changed.json()["price_per_hour"], changed.json()["count"]) == ("2.19", 3)
    assert changed.json()["capacity"] == 3
    assert provider.get(f"/v1/offers/{offer['id']}").json()["price_per_hour"] == "2.19"

    limit = provider.patch(f"/v1/offers/{offer['id']}", json={"available_hours": 12})
    assert limit.json()["available_hours"] == 12
    cleared = provider.patch(f"/v1/offers/{offer['id']}", json={"available_hours": None})
    assert cleared.json()["available_hours"] is None

    null_price = provider.patch(f"/v1/offers/{offer['id']}", json={"price_per_hour": None})
    assert null_price.status_code == 422
    assert null_price.json()["error"]["field"] == "body.price_per_hour"
    moved = provider.patch(f"/v1/offers/{offer['id']}", json={"region": "elsewhere"})
    assert moved.status_code == 422


def test_other_providers_offers_answer_404(
    db: Session, provider: Any, client_for: ClientFactory
) -> None:
    offer = provider.post("/v1/offers", json=offer_body()).json()
    _, rival_key = make_account(db, Role.provider)
    rival = client_for(rival_key)
    assert rival.patch(f"/v1/offers/{offer['id']}", json={"capacity": 1}).status_code == 404
    assert rival.delete(f"/v1/offers/{offer['id']}").status_code == 404
    assert provider.get(f"/v1/offers/{offer['id']}").json()["count"] == 8


def test_withdrawn_offers_leave_the_market(
    db: Session, provider: Any, client_for: ClientFactory
) -> None:
    offer = provider.post("/v1/offers", json=offer_body()).json()
    withdrawn = provider.delete(f"/v1/offers/{offer['id']}")
    assert withdrawn.status_code == 200
    assert withdrawn.json()["status"] == "withdrawn"
    assert withdrawn.json()["withdrawn_at"] is not None
    assert provider.delete(f"/v1/offers/{offer['id']}").status_code == 200  # idempotent

    again = provider.patch(f"/v1/offers/{offer['id']}", json={"capacity": 1})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"

    mine = provider.get("/v1/offers", params={"mine": True, "status": "withdrawn"}).json()
    assert [o["id"] for o in mine["items"]] == [offer["id"]]

    _, key = make_account(db, Role.developer)
    developer = client_for(key)
    assert offer["id"] not in [o["id"] for o in developer.get("/v1/offers").json()["items"]]
    assert developer.get(f"/v1/offers/{offer['id']}").status_code == 404
    hidden = developer.get("/v1/offers", params={"status": "withdrawn"}).json()
    assert hidden["items"] == []


def test_anyone_authenticated_can_read_an_active_offer(
    db: Session, provider: Any, client_for: ClientFactory
) -> None:
    offer = provider.post("/v1/offers", json=offer_body()).json()
    _, key = make_account(db, Role.developer)
    assert client_for(key).get(f"/v1/offers/{offer['id']}").json()["id"] == offer["id"]
    assert client_for(None).get(f"/v1/offers/{offer['id']}").status_code == 401
    assert client_for(key).get("/v1/offers/off_missing").status_code == 404
