"""The dashboard's API keys page, and admins disabling accounts from the admin page."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy.orm import Session

from broker.models.account import Role
from tests.conftest import ClientFactory
from tests.factories import make_account
from tests.web.conftest import Browser

_NEW_KEY = re.compile(r'data-testid="new-key">(bk_[^<]+)<')


def test_a_person_creates_rotates_and_revokes_keys_and_revoking_ends_the_session(
    db: Session, client_for: ClientFactory, browser_for: Any
) -> None:
    me: Browser = browser_for(Role.developer)
    listing = me.get("/keys")
    assert listing.status_code == 200
    assert me.key[:10] in listing.text
    assert me.key not in listing.text  # a key is shown once, when it is made

    created = me.post("/keys")
    assert created.status_code == 200
    new_key = _NEW_KEY.search(created.text)
    assert new_key
    assert client_for(new_key.group(1)).get("/v1/me").json()["id"] == me.account.id

    rows = client_for(new_key.group(1)).get("/v1/keys").json()
    new_id = next(k["id"] for k in rows if k["prefix"] == new_key.group(1)[:10])
    signed_in_with = next(k["id"] for k in rows if k["prefix"] == me.key[:10])
    rotated = me.post(f"/keys/{new_id}/rotate")
    assert rotated.status_code == 200
    replacement = _NEW_KEY.search(rotated.text)
    assert replacement
    assert client_for(new_key.group(1)).get("/v1/me").status_code == 401
    assert client_for(replacement.group(1)).get("/v1/me").status_code == 200

    someone_else = make_account(db, Role.developer)[1]
    foreign = client_for(someone_else).get("/v1/keys").json()[0]["id"]
    assert me.post(f"/keys/{foreign}/revoke").status_code == 404

    # Revoking the key this session signed in with ends the session.
    assert me.post(f"/keys/{signed_in_with}/revoke").status_code == 200
    ended = me.get("/keys", follow_redirects=False)
    assert ended.status_code == 303
    assert ended.headers["location"].startswith("/signin")


def test_an_admin_disables_an_account_and_its_sessions_end(
    db: Session, client_for: ClientFactory, browser_for: Any
) -> None:
    admin: Browser = browser_for(Role.admin)
    provider: Browser = browser_for(Role.provider)
    assert provider.get("/offers").status_code == 200
    page = admin.get("/admin")
    assert f"/admin/accounts/{provider.account.id}/disable" in page.text
    assert f"/admin/accounts/{admin.account.id}/disable" not in page.text  # never itself

    done = admin.post(f"/admin/accounts/{provider.account.id}/disable")
    assert done.status_code == 303
    assert "disabled" in admin.get(done.headers["location"]).text
    ended = provider.get("/offers", follow_redirects=False)
    assert ended.status_code == 303
    assert client_for(provider.key).get("/v1/me").status_code == 401
    refused = admin.post(f"/admin/accounts/{admin.account.id}/disable")
    assert refused.status_code == 409

    assert admin.post(f"/admin/accounts/{provider.account.id}/enable").status_code == 303
    assert client_for(provider.key).get("/v1/me").status_code == 200
    outsider = browser_for(Role.developer)
    assert outsider.post(f"/admin/accounts/{provider.account.id}/disable").status_code == 403
