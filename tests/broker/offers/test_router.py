from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session

from broker.models.account import Account, Role
from broker.models.offer import Offer
from broker.offers import pages, service
from broker.offers import router as router_module
from broker.offers.schemas import OfferOut, OfferQuery
from broker.pagination import Page
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


def _page(db: Session, viewer: Account, **params: Any) -> bytes:
    """What a search answers, as FastAPI would give ``Page[OfferOut]`` from ORM offers."""
    query = OfferQuery.model_validate(params)
    db.expire_all()  # the offers as stored, as a request's own session reads them
    rows, total = service.search_offers(db, viewer, query)
    return (
        Page[OfferOut]
        .of([OfferOut.model_validate(o) for o in rows], total, query)
        .model_dump_json()
        .encode()
    )


def test_search_answers_the_json_of_its_response_model(
    db: Session, client_for: ClientFactory
) -> None:
    seller, seller_key = make_account(db, Role.provider)
    odd = make_offer(
        db,
        seller,
        accelerator="h100-sxm",
        price_per_hour="1000000",
        tflops_bf16=1e-7,
        mem_bw_gbps=1234.567,
        available_hours=0.5,
        lat=1e-5,
        lon=-0.0,
        efficiency=1,
    )
    odd.created_at = odd.created_at.replace(microsecond=0)  # written without a fraction
    make_offer(db, seller, accelerator="mi300x", price_per_hour="0.000001", count=1)
    make_offer(db, seller, accelerator="tpu-v5e", price_per_hour="2.5")
    gone = make_offer(db, seller, accelerator="l4", price_per_hour="0.123")
    service.withdraw_offer(db, seller, gone.id)
    db.flush()
    admin, admin_key = make_account(db, Role.admin)
    developer, developer_key = make_account(db, Role.developer)

    cases: list[tuple[Account, str, dict[str, Any]]] = [
        (developer, developer_key, {}),
        (developer, developer_key, {"sort": "-created", "limit": 2, "offset": 1}),
        (developer, developer_key, {"status": "withdrawn"}),
        (seller, seller_key, {"status": "withdrawn"}),
        (seller, seller_key, {"mine": True, "sort": "-price"}),
        (admin, admin_key, {"status": "withdrawn", "accelerator": "L4"}),
    ]
    for viewer, key, params in cases:
        response = client_for(key).get("/v1/offers", params=params)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        assert response.content == _page(db, viewer, **params), params
    everything = client_for(admin_key).get("/v1/offers", params={"limit": 1}).json()
    assert everything["items"][0]["price_per_hour"] == "0.000001"
    assert everything["total"] == 3


def test_search_shows_withdrawn_offers_only_to_their_provider_and_admins(
    db: Session, client_for: ClientFactory
) -> None:
    seller, seller_key = make_account(db, Role.provider)
    rival, rival_key = make_account(db, Role.provider)
    _, admin_key = make_account(db, Role.admin)
    mine = make_offer(db, seller)
    theirs = make_offer(db, rival)
    for provider, offer in ((seller, mine), (rival, theirs)):
        service.withdraw_offer(db, provider, offer.id)

    def ids(key: str, **params: Any) -> list[str]:
        response = client_for(key).get("/v1/offers", params={"status": "withdrawn", **params})
        assert response.status_code == 200, response.text
        return [o["id"] for o in response.json()["items"]]

    assert ids(seller_key) == [mine.id]
    assert ids(rival_key) == [theirs.id]
    assert sorted(ids(admin_key)) == sorted([mine.id, theirs.id])
    assert ids(admin_key, mine=True) == []
    assert ids(seller_key, sort="-created") == [mine.id]


def test_search_totals_on_every_page(db: Session, client_for: ClientFactory) -> None:
    seller, _ = make_account(db, Role.provider)
    # Equal prices: the id orders them, whichever way the price is sorted.
    offers = sorted((make_offer(db, seller, price_per_hour="2.00") for _ in range(5)), key=id_of)
    _, key = make_account(db, Role.developer)
    client = client_for(key)

    def page(**params: Any) -> tuple[list[str], int]:
        body = client.get("/v1/offers", params=params).json()
        return [o["id"] for o in body["items"]], body["total"]

    every = [o.id for o in offers]
    assert page(limit=2) == (every[:2], 5)
    assert page(limit=2, offset=4) == (every[4:], 5)  # the last page
    assert page(limit=5) == (every, 5)
    assert page(limit=10) == (every, 5)
    assert page(limit=2, offset=10) == ([], 5)  # past the end
    assert page(sort="-price", limit=3, offset=1) == (every[1:4], 5)
    assert page(region="nowhere") == ([], 0)
    assert page(region="nowhere", offset=3) == ([], 0)


def id_of(offer: Offer) -> str:
    return offer.id


def test_search_answers_offers_as_they_are_now(
    db: Session, client_for: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    seller, seller_key = make_account(db, Role.provider)
    offers = [make_offer(db, seller, price_per_hour=f"2.0{i}") for i in range(3)]
    developer, developer_key = make_account(db, Role.developer)
    client, provider = client_for(developer_key), client_for(seller_key)

    first = client.get("/v1/offers")
    assert client.get("/v1/offers").content == first.content  # kept JSON, the same bytes
    changed = provider.patch(f"/v1/offers/{offers[1].id}", json={"price_per_hour": "1.50"})
    assert changed.status_code == 200, changed.text
    now = client.get("/v1/offers")
    assert now.content == _page(db, developer)
    assert [o["price_per_hour"] for o in now.json()["items"]] == ["1.50", "2.00", "2.02"]

    monkeypatch.setattr(pages, "MAX_KEPT", 1)  # fewer kept than a page holds
    assert client.get("/v1/offers").content == now.content


def test_the_short_way_answers_as_fastapi_does(
    db: Session, client_for: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Well-formed searches skip FastAPI's dependency solving (``broker.shortcuts``); a
    search sent FastAPI's way answers alike."""
    seller, _ = make_account(db, Role.provider)
    for price in ("2.10", "2.20", "2.30"):
        make_offer(db, seller, price_per_hour=price)
    _, key = make_account(db, Role.developer)
    client = client_for(key)
    short: list[object] = []
    well_formed = router_module._well_formed

    def counted(params: Any) -> Any:
        query = well_formed(params)
        short.append(query)
        return query

    monkeypatch.setattr(router_module, "_well_formed", counted)
    # A parameter given twice counts with its last value, as FastAPI reads it.
    path = "/v1/offers?sort=-price&limit=1&limit=2&offset=1"
    fast = client.get(path)
    assert fast.status_code == 200, fast.text
    assert [o["price_per_hour"] for o in fast.json()["items"]] == ["2.20", "2.10"]
    monkeypatch.setattr(router_module, "_well_formed", lambda params: None)
    slow = client.get(path)
    assert [q is not None for q in short] == [True]  # the first went the short way
    assert slow.content == fast.content
    assert slow.headers["content-type"] == fast.headers["content-type"]


@pytest.mark.parametrize(
    ("headers", "params", "status", "field"),
    [
        ({}, {}, 401, None),
        ({"Authorization": "Basic abc"}, {}, 401, None),  # not a bearer key
        ({"Authorization": "Bearer bk_nope"}, {}, 401, None),
        ({"Authorization": "Bearer bk_nope"}, {"limit": 0}, 401, None),  # the key first
        (None, {"limit": 0}, 422, "query.limit"),
        (None, {"sort": "cheapest"}, 422, "query.sort"),
        (None, {"max_prise": 3}, 422, "query.max_prise"),
    ],
)
def test_what_the_short_way_leaves_gets_fastapis_errors(
    db: Session,
    client_for: ClientFactory,
    headers: dict[str, str] | None,
    params: dict[str, Any],
    status: int,
    field: str | None,
) -> None:
    _, key = make_account(db, Role.developer)
    client = client_for(key if headers is None else None)
    response = client.get("/v1/offers", params=params, headers=headers)
    assert response.status_code == status, response.text
    if field is not None:
        assert response.json()["error"]["field"] == field


def test_hardware_figures_may_be_lower_than_the_datasheet_never_higher(
    db: Session, client_for: ClientFactory
) -> None:
    """Inflated figures would make every runtime estimate near zero and win matches."""
    _, key = make_account(db, Role.provider)
    provider = client_for(key)
    for field, value in (
        ("tflops_bf16", 1e6),
        ("tflops_fp32", 68),
        ("mem_bw_gbps", 3351),
        ("memory_gib", 81),
    ):
        refused = provider.post(
            "/v1/offers", json=offer_body(accelerator="h100-sxm", **{field: value})
        )
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["field"] == f"body.{field}"
        assert "datasheet" in error["message"]
    capped = provider.post(
        "/v1/offers", json=offer_body(accelerator="h100-sxm", tflops_bf16=700, memory_gib=80)
    )
    assert capped.status_code == 201, capped.text
    assert capped.json()["tflops_bf16"] == 700
