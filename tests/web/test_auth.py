"""Signing in and out, the cookie's attributes, CSRF, and who may open which page."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy.orm import Session

from broker.accounts.service import issue_key
from broker.db import utcnow
from broker.models.account import ApiKey, Role
from broker.models.node import Node
from tests.conftest import ClientFactory
from tests.factories import make_account
from tests.web.conftest import Browser, csrf_of, sign_in


def _cookie_header(response: Any, name: str) -> str:
    headers = [h for h in response.headers.get_list("set-cookie") if h.startswith(f"{name}=")]
    assert headers, f"no {name} cookie set"
    return str(headers[-1])


def test_signing_in_sets_an_httponly_samesite_cookie(
    db: Session, client_for: ClientFactory
) -> None:
    _, key = make_account(db, Role.developer)
    client = client_for(None)
    first = client.get("/jobs", follow_redirects=False)
    assert first.status_code == 303
    assert first.headers["location"] == "/signin?next=%2Fjobs"

    response = sign_in(client, key, next_url="/jobs")
    assert response.status_code == 303
    assert response.headers["location"] == "/jobs"
    cookie = _cookie_header(response, "broker_session")
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie
    assert "Path=/" in cookie
    assert "Secure" not in cookie  # plain http (local use); see the https test below
    assert key not in cookie  # the cookie names the key; it never holds it
    page = client.get("/jobs")
    assert page.status_code == 200
    assert "My jobs" in page.text


def test_over_https_the_cookie_is_secure(db: Session, client_for: ClientFactory) -> None:
    _, key = make_account(db, Role.provider)
    client = client_for(None)
    client.base_url = client.base_url.copy_with(scheme="https")
    response = sign_in(client, key)
    assert response.status_code == 303
    assert "Secure" in _cookie_header(response, "broker_session")


def test_a_wrong_a_node_or_a_revoked_key_does_not_sign_in(
    db: Session, client_for: ClientFactory
) -> None:
    account, key = make_account(db, Role.provider)
    client = client_for(None)
    wrong = sign_in(client, key + "x")
    assert wrong.status_code == 401
    assert "unknown or revoked" in wrong.text
    node = Node(
        id="node_w", provider_id=account.id, name="w", region="r", country="NL", lat=0, lon=0
    )
    db.add(node)
    db.flush()
    assert sign_in(client, issue_key(db, account, node_id=node.id)).status_code == 401
    db.query(ApiKey).filter(ApiKey.account_id == account.id).update({"revoked_at": utcnow()})
    assert sign_in(client, key).status_code == 401


def test_revoking_the_key_ends_the_session(db: Session, browser_for: Any) -> None:
    developer: Browser = browser_for(Role.developer)
    assert developer.get("/jobs").status_code == 200
    db.query(ApiKey).filter(ApiKey.account_id == developer.account.id).update(
        {"revoked_at": utcnow()}
    )
    gone = developer.get("/jobs", follow_redirects=False)
    assert gone.status_code == 303
    assert gone.headers["location"].startswith("/signin")


def test_signing_out_ends_the_session(browser_for: Any) -> None:
    provider: Browser = browser_for(Role.provider)
    response = provider.post("/signout")
    assert response.status_code == 303
    assert response.headers["location"] == "/signin"
    assert 'broker_session=""' in _cookie_header(response, "broker_session")  # deleted
    assert provider.get("/offers", follow_redirects=False).status_code == 303
    # A form sent after the session ended goes to sign in, then home (not to its target).
    late = provider.client.post("/offers/off_x/withdraw", follow_redirects=False)
    assert late.headers["location"] == "/signin"


def test_a_tampered_cookie_is_refused(browser_for: Any) -> None:
    admin: Browser = browser_for(Role.admin)
    token = admin.client.cookies.get("broker_session")
    assert token
    body, rest = token.split(".", 1)  # itsdangerous: payload.timestamp.signature
    admin.client.cookies.set("broker_session", f"{body}x.{rest}")
    assert admin.get("/admin", follow_redirects=False).status_code == 303


def test_htmx_requests_are_told_to_navigate_to_sign_in(client_for: ClientFactory) -> None:
    response = client_for(None).get("/market", headers={"HX-Request": "true"})
    assert response.status_code == 204
    assert response.headers["HX-Redirect"] == "/signin?next=%2Fmarket"


def test_every_post_needs_the_sessions_csrf_token(db: Session, browser_for: Any) -> None:
    provider: Browser = browser_for(Role.provider)
    other: Browser = browser_for(Role.provider)
    offer = {
        "accelerator": "l4",
        "count": "1",
        "price_per_hour": "0.70",
        "region": "us-central1",
        "country": "US",
        "lat": "41.2",
        "lon": "-95.8",
    }
    missing = provider.client.post("/offers", data=offer, follow_redirects=False)
    assert missing.status_code == 403
    assert "expired or did not come from this site" in missing.text
    stolen = provider.client.post(
        "/offers", data={**offer, "csrf_token": other.csrf}, follow_redirects=False
    )
    assert stolen.status_code == 403
    odd = provider.client.post(
        "/offers", data={**offer, "csrf_token": "\u00e9"}, follow_redirects=False
    )
    assert odd.status_code == 403
    assert provider.post("/offers", offer).status_code == 303
    # The header works too (htmx requests may send it instead of a field).
    header = provider.client.post(
        "/signout", headers={"X-CSRF-Token": provider.csrf}, follow_redirects=False
    )
    assert header.status_code == 303


def test_signing_in_needs_the_forms_token(db: Session, client_for: ClientFactory) -> None:
    """Login CSRF: another site cannot sign a browser in to the attacker's account."""
    _, key = make_account(db, Role.developer)
    client = client_for(None)
    assert client.post("/signin", data={"api_key": key}).status_code == 403
    page = client.get("/signin")
    client.cookies.clear()  # the token without the nonce cookie it was made from
    refused = client.post("/signin", data={"api_key": key, "csrf_token": csrf_of(page.text)})
    assert refused.status_code == 403


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/", "/\\evil"])
def test_after_sign_in_only_local_pages(
    db: Session, client_for: ClientFactory, target: str
) -> None:
    _, key = make_account(db, Role.developer)
    response = sign_in(client_for(None), key, next_url=target)
    assert response.headers["location"] == "/jobs"


ROLE_PAGES = {
    "/market": {Role.developer, Role.provider, Role.admin},
    "/jobs": {Role.developer, Role.admin},
    "/jobs/new": {Role.developer, Role.admin},
    "/nodes": {Role.provider, Role.admin},
    "/offers": {Role.provider, Role.admin},
    "/invoices": {Role.developer, Role.admin},
    "/earnings": {Role.provider, Role.admin},
    "/admin": {Role.admin},
}


@pytest.mark.parametrize("role", list(Role))
def test_each_role_opens_only_its_pages(browser_for: Any, role: Role) -> None:
    person: Browser = browser_for(role)
    home = person.get("/", follow_redirects=False)
    assert home.status_code == 303
    menu = person.get(home.headers["location"]).text
    for url, allowed in ROLE_PAGES.items():
        response = person.get(url)
        assert response.status_code == (200 if role in allowed else 403), url
        # The menu offers exactly the pages the role may open.
        linked = re.search(rf'<a href="{re.escape(url)}"[ >]', menu) is not None
        admin_bid = role == Role.admin and url == "/jobs/new"  # admins bid from the jobs page
        assert linked == (role in allowed and not admin_bid), url
    forbidden = person.get("/admin")
    if role != Role.admin:
        assert "this needs an admin account" in forbidden.text
        assert "<html" in forbidden.text  # a page, not the API's JSON
