"""The dashboard's sign-in session: a signed cookie, and CSRF tokens for forms.

The cookie holds the id of the API key the person signed in with and a random
nonce, signed and timestamped with the broker's secret key by itsdangerous
(``URLSafeTimedSerializer``; it expires ``SESSION_SECONDS`` after it was issued). Nothing in it is
secret, and it is never trusted unsigned: every request checks the signature,
the expiry, and that the key is still unrevoked and its account enabled, so
revoking the key ends the session at the next click.

Every form carries a CSRF token derived from the session's nonce (before
sign-in, from a nonce cookie of its own); every POST is refused without it.
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request, Response
from itsdangerous import BadData, Signer, TimestampSigner, URLSafeTimedSerializer
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from broker.accounts.service import key_owner
from broker.auth import SIGNED_IN
from broker.config import Settings, get_settings
from broker.db import SessionDep
from broker.errors import BrokerError
from broker.models.account import Account, Role

SESSION_COOKIE = "broker_session"
SIGNIN_COOKIE = "broker_signin"
SESSION_SECONDS = 12 * 3600
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"


class SignInRequired(Exception):
    """No valid session: send the browser to the sign-in page, then back to ``next``."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


class CsrfFailed(Exception):
    """A POST without the form's CSRF token (or with another session's)."""


def secret_key(settings: Settings) -> bytes:
    """BROKER_SECRET_KEY, or a random key generated once and kept in the data dir, so
    a fresh clone signs cookies without configuration and restarts keep sessions."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    return _stored_secret(settings.data_dir / "secret_key")


@cache
def _stored_secret(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: two workers starting at once agree on whichever key was written first.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
    key = path.read_text().strip()
    if len(key) < 32:
        raise RuntimeError(f"{path} holds a key shorter than 32 characters; delete it")
    return key.encode()


class _Clock(TimestampSigner):
    """itsdangerous's timestamp signer, on a clock a test may set (``now``)."""

    now: float | None = None

    def get_timestamp(self) -> int:
        return int(self.now if self.now is not None else time.time())


def _sessions(secret: bytes, now: float | None) -> URLSafeTimedSerializer:
    clock = type("_At", (_Clock,), {"now": now})
    return URLSafeTimedSerializer(secret, salt="session", signer=clock)


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison of anything a client sent (bytes: a str with non-ASCII
    characters would make ``compare_digest`` raise)."""
    return hmac.compare_digest(given.encode(), expected.encode())


@dataclass(frozen=True, slots=True)
class SessionToken:
    key_id: str
    expires: int
    nonce: str


def issue(secret: bytes, key_id: str, now: float | None = None) -> str:
    """A signed session token for the API key ``key_id``."""
    return _sessions(secret, now).dumps({"k": key_id, "n": secrets.token_urlsafe(16)})


def verify(secret: bytes, token: str, now: float | None = None) -> SessionToken | None:
    """The token's contents if its signature holds and it has not expired; else None."""
    try:
        payload, issued = _sessions(secret, now).loads(
            token, max_age=SESSION_SECONDS - 1, return_timestamp=True
        )
        return SessionToken(
            str(payload["k"]), int(issued.timestamp()) + SESSION_SECONDS, str(payload["n"])
        )
    except (BadData, KeyError, TypeError, UnicodeError):
        return None


def csrf_token(secret: bytes, nonce: str) -> str:
    return Signer(secret, salt="csrf").get_signature(nonce).decode()


def csrf_ok(secret: bytes, nonce: str, token: object) -> bool:
    """Whether ``token`` is the CSRF token of ``nonce`` (a form field: any type)."""
    return bool(nonce) and isinstance(token, str) and _same(token, csrf_token(secret, nonce))


def set_cookie(
    request: Request, response: Response, name: str, value: str, max_age: int, path: str = "/"
) -> None:
    """HttpOnly (no script reads it), SameSite=Lax (not sent on other sites' POSTs), and
    Secure over https or when BROKER_COOKIE_SECURE says so."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=path,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https" or get_settings().cookie_secure,
    )


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who is signed in, as pages show it: plain values, still readable when a
    refused request's transaction has rolled back and its rows are gone."""

    id: str
    name: str
    role: Role


@dataclass(frozen=True, slots=True)
class WebUser:
    """The person signed in: their account (for the services), who they are (for the
    pages), and the CSRF token their forms carry."""

    account: Account
    viewer: Viewer
    csrf: str


def web_user(request: Request, session: SessionDep) -> WebUser:
    """Route dependency: the signed-in account, or a redirect to the sign-in page."""
    secret = secret_key(get_settings())
    token = verify(secret, request.cookies.get(SESSION_COOKIE, ""))
    account = _signed_in(session, token.key_id) if token else None
    if token is None or account is None:
        # Back to this page after signing in; a form's target is no page to go back to.
        next_url = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(next_url if request.method in ("GET", "HEAD") else "")
    viewer = Viewer(account.id, account.name, account.role)
    user = WebUser(account, viewer, csrf_token(secret, token.nonce))
    request.state.web_user = user  # for error pages rendered after the route gave up
    request.state.account_id = account.id  # for the access log, as the API's requests
    return user


def _signed_in(session: Session, key_id: str) -> Account | None:
    """The account a session's key still admits, by the API's own rule (``SIGNED_IN``)."""
    owner = key_owner(session, key_id)
    try:
        return None if owner is None else SIGNED_IN.admit(owner).account
    except BrokerError:  # a node key: never a person's session
        return None


WebUserDep = Annotated[WebUser, Depends(web_user)]


async def checked_form(request: Request, user: WebUserDep) -> FormData:
    """Route dependency for every POST: the form, once its CSRF token is checked."""
    form = await request.form()
    given = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
    if not isinstance(given, str) or not _same(given, user.csrf):
        raise CsrfFailed
    return form


CheckedForm = Annotated[FormData, Depends(checked_form)]


async def plain_form(request: Request) -> FormData:
    """The form of the sign-in POST, which checks its own token (there is no session yet)."""
    return await request.form()


PlainForm = Annotated[FormData, Depends(plain_form)]
