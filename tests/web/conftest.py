"""Dashboard clients: a browser-like TestClient signed in through the sign-in form."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from broker.models.account import Role
from tests.conftest import ClientFactory
from tests.factories import make_account

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    """The CSRF token a page's forms carry."""
    match = _CSRF.search(html)
    assert match, "the page has no form with a CSRF token"
    return match.group(1)


def sign_in(client: TestClient, key: str, next_url: str = "") -> Any:
    page = client.get("/signin", params={"next": next_url} if next_url else None)
    assert page.status_code == 200
    return client.post(
        "/signin",
        data={"api_key": key, "csrf_token": csrf_of(page.text), "next": next_url},
        follow_redirects=False,
    )


class Browser:
    """One signed-in person: ``get`` pages, ``post`` forms with the page's CSRF token."""

    def __init__(self, client: TestClient, account: Any, key: str) -> None:
        self.client, self.account, self.key = client, account, key
        response = sign_in(client, key)
        assert response.status_code == 303, response.text
        self.csrf = csrf_of(client.get(response.headers["location"]).text)

    def get(self, url: str, **kwargs: Any) -> Any:
        return self.client.get(url, **kwargs)

    def post(self, url: str, data: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        kwargs.setdefault("follow_redirects", False)
        return self.client.post(url, data={"csrf_token": self.csrf, **(data or {})}, **kwargs)


@pytest.fixture
def browser_for(db: Session, client_for: ClientFactory) -> Any:
    """``browser_for(role)``: a new account of that role, signed in to the dashboard."""

    def make(role: Role) -> Browser:
        account, key = make_account(db, role)
        return Browser(client_for(None), account, key)

    return make
