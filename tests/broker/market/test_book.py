from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session

from broker.models.account import Role
from broker.models.job_state import JobState
from broker.offers.service import withdraw_offer
from tests.conftest import ClientFactory
from tests.factories import make_account, make_job, make_offer


def _book(client: Any, **params: Any) -> dict[str, Any]:
    response = client.get("/v1/market/book", params=params)
    assert response.status_code == 200, response.text
    return {b["accelerator"]: b for b in response.json()["books"]}


def _levels(side: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    return [(lvl["price_per_hour"], lvl["quantity"], lvl["orders"]) for lvl in side]


def test_asks_are_grouped_by_price_cheapest_first(db: Session, client_for: ClientFactory) -> None:
    seller, _ = make_account(db, Role.provider)
    other, _ = make_account(db, Role.provider)
    make_offer(db, seller, accelerator="h100-sxm", price_per_hour="2.50", count=8)
    make_offer(db, other, accelerator="h100-sxm", price_per_hour="2.50", count=4)
    make_offer(db, other, accelerator="h100-sxm", price_per_hour="1.99", count=2)
    gone = make_offer(db, other, accelerator="h100-sxm", price_per_hour="0.50", count=16)
    withdraw_offer(db, other, gone.id)
    make_offer(db, seller, accelerator="mi300x", price_per_hour="2.10", count=8)
    _, key = make_account(db, Role.developer)

    books = _book(client_for(key))
    assert set(books) == {"h100-sxm", "mi300x"}
    h100 = books["h100-sxm"]
    assert _levels(h100["asks"]) == [("1.99", 2, 1), ("2.50", 12, 2)]
    assert (h100["name"], h100["vendors"], h100["platforms"]) == (
        "NVIDIA H100 SXM5 80GB",
        ["nvidia"],
        ["cuda"],
    )
    assert h100["bids"] == []
    assert h100["best_bid"] is None
    assert h100["best_ask"] == "1.99"


def test_bids_join_the_books_of_models_they_accept(db: Session, client_for: ClientFactory) -> None:
    seller, _ = make_account(db, Role.provider)
    make_offer(db, seller, accelerator="h100-sxm", price_per_hour="2.50")
    make_offer(db, seller, accelerator="mi300x", price_per_hour="2.10")
    make_offer(db, seller, accelerator="tpu-v5e", price_per_hour="1.20")
    buyer, key = make_account(db, Role.developer)
    make_job(
        db, buyer, platforms=["cuda", "rocm", "tpu"], max_price_per_hour="3.00", accelerators=2
    )
    make_job(
        db, buyer, platforms=["cuda", "rocm", "tpu"], max_price_per_hour="3.00", accelerators=1
    )
    make_job(db, buyer, platforms=["cuda"], max_price_per_hour="2.00", accelerators=4)
    make_job(db, buyer, platforms=["cuda", "rocm"], min_memory_gib=100, max_price_per_hour="5.00")
    make_job(db, buyer, platforms=["cuda", "rocm"], vendors=["amd"], max_price_per_hour="4.00")
    make_job(
        db, buyer, platforms=["tpu"], accelerator_models=["tpu-v6e"], max_price_per_hour="6.00"
    )
    cancelled = make_job(db, buyer, platforms=["cuda"], max_price_per_hour="9.00")
    cancelled.move_to(JobState.cancelled)
    db.flush()

    books = _book(client_for(key))
    assert _levels(books["h100-sxm"]["bids"]) == [("3.00", 3, 2), ("2.00", 4, 1)]
    assert _levels(books["mi300x"]["bids"]) == [("5.00", 1, 1), ("4.00", 1, 1), ("3.00", 3, 2)]
    assert _levels(books["tpu-v5e"]["bids"]) == [("3.00", 3, 2)]
    # Named by a job but offered by nobody: the book shows the demand, including
    # the bids of jobs that take any TPU.
    assert books["tpu-v6e"]["asks"] == []
    assert _levels(books["tpu-v6e"]["bids"]) == [("6.00", 1, 1), ("3.00", 3, 2)]
    assert "h200" not in books  # nobody offers it and no job names it
    assert books["tpu-v6e"]["best_ask"] is None

    h100 = books["h100-sxm"]
    assert (h100["best_ask"], h100["best_bid"], h100["spread"]) == ("2.50", "3.00", None)
    assert books["tpu-v5e"]["spread"] is None  # crossed: the bid is above the ask
    make_offer(db, seller, accelerator="l4", price_per_hour="4.00")
    assert _book(client_for(key))["l4"]["spread"] == "1.00"


def test_one_model_and_limited_depth(db: Session, client_for: ClientFactory) -> None:
    seller, _ = make_account(db, Role.provider)
    for price in ("1.00", "1.10", "1.20", "1.30"):
        make_offer(db, seller, accelerator="h100-sxm", price_per_hour=price)
    make_offer(db, seller, accelerator="mi300x", price_per_hour="2.10")
    _, key = make_account(db, Role.developer)
    books = _book(client_for(key), accelerator="H100", depth=2)
    assert list(books) == ["h100-sxm"]
    assert _levels(books["h100-sxm"]["asks"]) == [("1.00", 8, 1), ("1.10", 8, 1)]
    assert client_for(None).get("/v1/market/book").status_code == 401
    assert client_for(key).get("/v1/market/book", params={"depth": 0}).status_code == 422


def test_bid_depth_counts_prices_over_every_kind_of_job(
    db: Session, client_for: ClientFactory
) -> None:
    """Bids of jobs with different needs share price levels; depth cuts the merged list."""
    seller, _ = make_account(db, Role.provider)
    make_offer(db, seller, accelerator="h100-sxm", price_per_hour="1.00")
    buyer, key = make_account(db, Role.developer)
    for price, platforms in (
        ("4.00", ["cuda"]),
        ("3.00", ["cuda", "rocm"]),
        ("3.00", ["cuda"]),
        ("2.00", ["cuda", "tpu"]),
        ("1.50", ["cuda"]),
    ):
        make_job(db, buyer, platforms=platforms, max_price_per_hour=price, accelerators=2)
    make_job(db, buyer, platforms=["cuda"], min_memory_gib=40, max_price_per_hour="3.00")
    make_job(db, buyer, platforms=["rocm"], max_price_per_hour="9.00")  # not an H100 bid

    books = _book(client_for(key), depth=3)
    assert _levels(books["h100-sxm"]["bids"]) == [("4.00", 2, 1), ("3.00", 5, 3), ("2.00", 2, 1)]
    assert books["h100-sxm"]["best_bid"] == "4.00"


def test_catalog_is_public(client_for: ClientFactory) -> None:
    entries = client_for(None).get("/v1/catalog").json()
    keys = {e["key"] for e in entries}
    assert {"h100-sxm", "mi300x", "tpu-v5e", "jetson-agx-orin"} <= keys


def test_each_ask_level_shows_the_carbon_of_an_accelerator_hour(
    db: Session, client_for: ClientFactory
) -> None:
    seller, _ = make_account(db, Role.provider)
    # One price, two grids: stated 700 W x PUE 1.2 x 100 g and 500 g per kWh.
    make_offer(
        db, seller, accelerator="h100-sxm", price_per_hour="2.50",
        power_w=700, pue=1.2, grid_g_per_kwh=100,
    )  # fmt: skip
    make_offer(
        db, seller, accelerator="h100-sxm", price_per_hour="2.50",
        power_w=700, pue=1.2, grid_g_per_kwh=500,
    )  # fmt: skip
    make_offer(
        db, seller, accelerator="h100-sxm", price_per_hour="3.00",
        power_w=350, pue=1.0, grid_g_per_kwh=20,
    )  # fmt: skip
    _, key = make_account(db, Role.developer)
    client = client_for(key)
    cheap, dear = _book(client)["h100-sxm"]["asks"]
    assert (cheap["gco2_per_hour_min"], cheap["gco2_per_hour_max"]) == (
        pytest.approx(84.0),
        pytest.approx(420.0),
    )
    assert dear["gco2_per_hour_min"] == dear["gco2_per_hour_max"] == pytest.approx(7.0)


def test_fractions_have_levels_of_their_own(db: Session, client_for: ClientFactory) -> None:
    seller, _ = make_account(db, Role.provider)
    make_offer(db, seller, price_per_hour="2.50", count=2)
    mig = ["3g.40gb@0", "2g.20gb@4", "1g.10gb@6"]
    make_offer(db, seller, price_per_hour="7.00", count=1, kind="mig", mig_instances=mig)
    make_offer(
        db, seller, price_per_hour="2.00", count=2, kind="shared", shares=4,
        memory_per_share_gib=20,
    )  # fmt: skip
    buyer, key = make_account(db, Role.developer)
    for _ in range(2):
        make_job(
            db, buyer, platforms=["cuda", "rocm"], max_price_per_hour="4.00",
            accelerators=0.25, accepts_shared=True,
        )  # fmt: skip
    make_job(
        db, buyer, platforms=["cuda", "rocm"], max_price_per_hour="9.00", mig_profile="3g.40gb"
    )
    make_job(db, buyer, max_price_per_hour="3.00", accelerators=1)

    h100 = _book(client_for(key))["h100-sxm"]
    # Whole accelerators: the whole offer and the shared one's free accelerators, not
    # the MIG GPU; whole bids only.
    assert _levels(h100["asks"]) == [("2.00", 2, 1), ("2.50", 2, 1)]
    assert _levels(h100["bids"]) == [("3.00", 1, 1)]
    asks = [
        (s["part"], s["isolated"], s["price_per_hour"], s["quantity"]) for s in h100["slice_asks"]
    ]
    assert asks == [
        ("1/4 shared", False, "2.00", 8),
        ("1g.10gb", True, "7.00", 1),
        ("2g.20gb", True, "7.00", 1),
        ("3g.40gb", True, "7.00", 1),
    ]
    bids = [
        (s["part"], s["isolated"], s["price_per_hour"], s["quantity"]) for s in h100["slice_bids"]
    ]
    assert bids == [("3g.40gb", True, "9.00", 1), ("0.25", False, "4.00", 2)]
    # A profile bid is only in the books of models that have the profile.
    make_offer(db, seller, accelerator="mi300x", price_per_hour="2.10")
    mi300x = _book(client_for(key))["mi300x"]
    assert [s["part"] for s in mi300x["slice_bids"]] == ["0.25"]
