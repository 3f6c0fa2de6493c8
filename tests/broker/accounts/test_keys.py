"""API keys through the API: each account manages its own (admins any); revoked keys
and disabled accounts are refused at once, their sessions and node keys with them."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from broker.accounts import service
from broker.db import utcnow
from broker.models.account import ApiKey, Role
from broker.nodes import service as nodes
from broker.nodes.schemas import NodeRegister
from tests.conftest import ClientFactory
from tests.factories import make_account
from tests.web.conftest import Browser

PLACE = {"region": "europe-west4", "country": "NL", "lat": 53.44, "lon": 6.84}


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_an_account_creates_lists_rotates_and_revokes_its_keys(
    db: Session, client_for: ClientFactory
) -> None:
    account, key = make_account(db, Role.developer)
    client = client_for(key)
    (first,) = client.get("/v1/keys").json()
    assert first["prefix"] == key[:10]
    assert first["account_id"] == account.id
    assert key not in str(first)

    # Its only key: it may not lock itself out.
    last = client.delete(f"/v1/keys/{first['id']}")
    assert last.status_code == 409
    assert "last API key" in last.json()["error"]["message"]

    created = client.post("/v1/keys", json={})
    assert created.status_code == 201
    second = created.json()["api_key"]
    assert client_for(second).get("/v1/me").json()["id"] == account.id
    revoked = client_for(second).delete(f"/v1/keys/{first['id']}")
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    refused = client.get("/v1/me")
    assert refused.status_code == 401
    assert client_for(second).delete(f"/v1/keys/{first['id']}").status_code == 200  # again

    rotated = client_for(second).post(f"/v1/keys/{created.json()['id']}/rotate")
    assert rotated.status_code == 201
    third = rotated.json()["api_key"]
    assert client_for(second).get("/v1/me").status_code == 401
    assert client_for(third).get("/v1/me").status_code == 200
    listed = {k["id"]: k for k in client_for(third).get("/v1/keys").json()}
    assert len(listed) == 3
    assert [k["revoked_at"] is None for k in listed.values()].count(True) == 1


def test_keys_of_other_accounts_are_out_of_reach_except_for_admins(
    db: Session, client_for: ClientFactory
) -> None:
    alice, alice_key = make_account(db, Role.developer)
    _, bob_key = make_account(db, Role.developer)
    _, admin_key = make_account(db, Role.admin)
    (alice_row,) = client_for(alice_key).get("/v1/keys").json()
    bob = client_for(bob_key)
    assert bob.delete(f"/v1/keys/{alice_row['id']}").status_code == 404
    assert bob.post(f"/v1/keys/{alice_row['id']}/rotate").status_code == 404
    assert bob.get("/v1/keys", params={"account_id": alice.id}).status_code == 403
    assert bob.post("/v1/keys", json={"account_id": alice.id}).status_code == 403

    admin = client_for(admin_key)
    assert [k["id"] for k in admin.get("/v1/keys", params={"account_id": alice.id}).json()] == [
        alice_row["id"]
    ]
    issued = admin.post("/v1/keys", json={"account_id": alice.id})
    assert issued.status_code == 201
    assert client_for(issued.json()["api_key"]).get("/v1/me").json()["id"] == alice.id
    # An admin revokes a leaked key even when it is the account's last but one.
    assert admin.delete(f"/v1/keys/{alice_row['id']}").status_code == 200
    assert client_for(alice_key).get("/v1/me").status_code == 401
    assert admin.post("/v1/keys", json={"account_id": "acc_nobody"}).status_code == 404


def test_a_disabled_account_is_refused_with_its_node_keys_and_sessions(
    db: Session, client_for: ClientFactory
) -> None:
    provider, provider_key = make_account(db, Role.provider)
    admin, admin_key = make_account(db, Role.admin)
    node, node_key, _ = nodes.register(db, provider, NodeRegister(name="box", **PLACE), 3)
    browser = Browser(client_for(None), provider, provider_key)
    assert browser.get("/nodes").status_code == 200
    beat = client_for(node_key).post(f"/v1/nodes/{node.id}/heartbeat", json={})
    assert beat.status_code == 200

    ops = client_for(admin_key)
    assert ops.post(f"/v1/accounts/{admin.id}/disable").status_code == 409  # not itself
    disabled = ops.post(f"/v1/accounts/{provider.id}/disable")
    assert disabled.status_code == 200
    assert disabled.json()["disabled_at"] is not None
    assert client_for(provider_key).get("/v1/me").status_code == 401
    assert client_for(node_key).post(f"/v1/nodes/{node.id}/heartbeat", json={}).status_code == 401
    ended = browser.get("/nodes", follow_redirects=False)
    assert ended.status_code == 303
    assert ended.headers["location"].startswith("/signin")
    listed = {a["id"]: a for a in ops.get("/v1/accounts").json()["items"]}
    assert listed[provider.id]["disabled_at"] is not None

    assert ops.post(f"/v1/accounts/{provider.id}/enable").status_code == 200
    assert client_for(provider_key).get("/v1/me").status_code == 200


def test_a_revoked_node_key_stops_that_node_only(db: Session, client_for: ClientFactory) -> None:
    provider, provider_key = make_account(db, Role.provider)
    one, one_key, _ = nodes.register(db, provider, NodeRegister(name="one", **PLACE), 3)
    two, two_key, _ = nodes.register(db, provider, NodeRegister(name="two", **PLACE), 3)
    owner = client_for(provider_key)
    node_keys = {k["node_id"]: k for k in owner.get("/v1/keys").json() if k["node_id"]}
    assert set(node_keys) == {one.id, two.id}
    rotate = owner.post(f"/v1/keys/{node_keys[one.id]['id']}/rotate")
    assert rotate.status_code == 422  # a node's agent gets its key by registering
    assert owner.delete(f"/v1/keys/{node_keys[one.id]['id']}").status_code == 200
    assert client_for(one_key).post(f"/v1/nodes/{one.id}/heartbeat", json={}).status_code == 401
    assert client_for(two_key).post(f"/v1/nodes/{two.id}/heartbeat", json={}).status_code == 200


def test_a_key_in_use_shows_when_it_was_last_used(db: Session, client_for: ClientFactory) -> None:
    _, key = make_account(db, Role.developer)
    client = client_for(key)
    (row,) = client.get("/v1/keys").json()
    # The first request wrote it (after its answer); a minute later, the next one does.
    (row,) = client.get("/v1/keys").json()
    assert row["last_used_at"] is not None
    stale = utcnow().replace(year=2020)
    db.execute(update(ApiKey).where(ApiKey.id == row["id"]).values(last_used_at=stale))
    service._touched.clear()
    client.get("/v1/me")
    (row,) = client.get("/v1/keys").json()
    assert not row["last_used_at"].startswith("2020")
