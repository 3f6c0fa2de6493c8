from __future__ import annotations

from sqlalchemy.orm import Session

from broker.models.account import Role
from tests.conftest import ClientFactory
from tests.factories import make_account


def test_me_needs_a_valid_key(db: Session, client_for: ClientFactory) -> None:
    account, key = make_account(db, Role.provider)
    me = client_for(key).get("/v1/me")
    assert me.status_code == 200
    assert me.json()["id"] == account.id
    assert me.json()["role"] == "provider"

    anonymous = client_for(None).get("/v1/me")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "unauthorized"
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert client_for("bk_wrong").get("/v1/me").status_code == 401


def test_admin_creates_and_lists_accounts(db: Session, client_for: ClientFactory) -> None:
    _, admin_key = make_account(db, Role.admin)
    admin = client_for(admin_key)
    created = admin.post("/v1/accounts", json={"name": "newcomer", "role": "developer"})
    assert created.status_code == 201
    new_key = created.json()["api_key"]
    assert client_for(new_key).get("/v1/me").json()["name"] == "newcomer"

    listing = admin.get("/v1/accounts", params={"limit": 200}).json()
    assert "newcomer" in {a["name"] for a in listing["items"]}
    assert all("api_key" not in a for a in listing["items"])

    duplicate = admin.post("/v1/accounts", json={"name": "newcomer", "role": "provider"})
    assert duplicate.status_code == 409
    assert duplicate.json()["error"]["field"] == "name"


def test_only_admins_manage_accounts(db: Session, client_for: ClientFactory) -> None:
    _, key = make_account(db, Role.developer)
    client = client_for(key)
    assert client.get("/v1/accounts").status_code == 403
    refused = client.post("/v1/accounts", json={"name": "sneaky", "role": "admin"})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "forbidden"
