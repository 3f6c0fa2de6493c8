"""Offers of parts of accelerators: MIG instances and shared accelerators, checked at
the edge; whole offers stay as they were (docs/market.md, fractions)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session

from broker.models.account import Role
from tests.conftest import ClientFactory, signed_in
from tests.factories import offer_body


@pytest.fixture
def provider(db: Session, client_for: ClientFactory) -> Any:
    return signed_in(db, client_for, Role.provider)


def _refused(provider: Any, field: str, **body: Any) -> str:
    answer = provider.post("/v1/offers", json=offer_body(**body))
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["field"] == field, error
    return str(error["message"])


def test_a_plain_offer_is_whole(provider: Any) -> None:
    offer = provider.post("/v1/offers", json=offer_body()).json()
    assert offer["kind"] == "whole"
    assert (offer["shares"], offer["shares_busy"], offer["memory_per_share_gib"]) == (0, 0, None)
    assert offer["mig_instances"] == offer["mig_busy"] == []


def test_a_shared_offer_states_its_shares_and_their_memory(provider: Any) -> None:
    body = offer_body(kind="shared", count=2, shares=4, memory_per_share_gib=20)
    answer = provider.post("/v1/offers", json=body)
    assert answer.status_code == 201, answer.text
    offer = answer.json()
    assert (offer["kind"], offer["shares"], offer["memory_per_share_gib"]) == ("shared", 4, 20)
    listed = provider.get("/v1/offers", params={"mine": True}).json()["items"]
    assert [(o["id"], o["kind"], o["shares"]) for o in listed] == [(offer["id"], "shared", 4)]


def test_a_shared_offer_without_memory_per_share_is_refused(provider: Any) -> None:
    message = _refused(provider, "body.memory_per_share_gib", kind="shared", shares=4)
    assert "memory_per_share_gib" in message


def test_a_shared_offer_without_shares_is_refused(provider: Any) -> None:
    assert "shares" in _refused(provider, "body.shares", kind="shared", memory_per_share_gib=10)


def test_shares_may_not_hold_more_memory_than_the_accelerator(provider: Any) -> None:
    message = _refused(
        provider, "body.memory_per_share_gib", kind="shared", shares=4, memory_per_share_gib=25
    )
    assert "80 GiB" in message


def test_share_figures_on_a_whole_offer_are_refused(provider: Any) -> None:
    assert "shared offers" in _refused(provider, "body.shares", shares=4)


def test_a_mig_offer_lists_its_instances(provider: Any) -> None:
    body = offer_body(kind="mig", count=1, mig_instances=["3g.40gb@4", "3g.40gb@0"])
    answer = provider.post("/v1/offers", json=body)
    assert answer.status_code == 201, answer.text
    offer = answer.json()
    assert offer["kind"] == "mig"
    assert offer["mig_instances"] == ["3g.40gb@0", "3g.40gb@4"]
    listed = provider.get("/v1/offers", params={"mine": True}).json()["items"]
    assert listed[0]["mig_instances"] == ["3g.40gb@0", "3g.40gb@4"]


def test_a_mig_offer_is_one_gpu(provider: Any) -> None:
    assert "count 1" in _refused(provider, "body.count", kind="mig", count=2)


def test_a_model_without_mig_may_not_be_offered_as_mig(provider: Any) -> None:
    message = _refused(provider, "body.kind", kind="mig", count=1, accelerator="l4")
    assert "no MIG profiles" in message
    assert "h100-sxm" in message


@pytest.mark.parametrize(
    ("instances", "words"),
    [
        (["1g.18gb@0"], "no profile 1g.18gb"),  # an H200 profile, not an H100's
        (["3g.40gb@2"], "may start at 0, 4"),
        (["4g.40gb@0", "3g.40gb@0"], "no other instance covers"),
    ],
)
def test_mig_instances_must_be_the_models_and_fit(
    provider: Any, instances: list[str], words: str
) -> None:
    message = _refused(provider, "body.mig_instances", kind="mig", count=1, mig_instances=instances)
    assert words in message


def test_offers_are_searched_by_what_they_sell(provider: Any) -> None:
    whole = provider.post("/v1/offers", json=offer_body()).json()
    shared = provider.post(
        "/v1/offers", json=offer_body(kind="shared", count=1, shares=2, memory_per_share_gib=40)
    ).json()
    cut = provider.post(
        "/v1/offers", json=offer_body(kind="mig", count=1, mig_instances=["7g.80gb@0"])
    ).json()
    for kind, offer in (("whole", whole), ("shared", shared), ("mig", cut)):
        found = provider.get("/v1/offers", params={"kind": kind}).json()["items"]
        assert [o["id"] for o in found] == [offer["id"]]
    assert provider.get("/v1/offers", params={"kind": "half"}).status_code == 422
