"""Signing in with an API key, and out."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Depends, Request, Response

from broker.accounts.service import authenticate_key
from broker.auth import SIGNED_IN
from broker.config import get_settings
from broker.db import SessionDep, read_only_session
from broker.errors import BrokerError
from web import session as web_session
from web.render import HOME, WebRoute, page, redirect
from web.session import (
    CSRF_FIELD,
    SESSION_COOKIE,
    SESSION_SECONDS,
    SIGNIN_COOKIE,
    CheckedForm,
    CsrfFailed,
    PlainForm,
    WebUserDep,
    csrf_ok,
    csrf_token,
    secret_key,
    set_cookie,
)

router = APIRouter(route_class=WebRoute, include_in_schema=False)


def safe_next(value: object) -> str:
    """Where to go after signing in: a path on this site only, never another site."""
    if not isinstance(value, str) or not value.startswith("/") or len(value) > 2000:
        return ""
    if value.startswith(("//", "/\\")) or any(c in value for c in "\r\n\t"):
        return ""
    return value


@router.get("/")
def home(user: WebUserDep) -> Response:
    return redirect(HOME[user.account.role])


def _signin_page(request: Request, next_url: str, status: int = 200, error: str = "") -> Response:
    # Before sign-in there is no session: the form's CSRF token comes from a nonce
    # cookie of its own, so another site cannot sign a browser in to its account.
    nonce = request.cookies.get(SIGNIN_COOKIE) or secrets.token_urlsafe(16)
    response = page(
        request,
        "signin.html",
        None,
        status_code=status,
        signin_csrf=csrf_token(secret_key(get_settings()), nonce),
        next=next_url,
        error=error,
    )
    set_cookie(request, response, SIGNIN_COOKIE, nonce, max_age=3600, path="/signin")
    return response


@router.get("/signin")
def signin_form(request: Request, next: str = "") -> Response:
    return _signin_page(request, safe_next(next))


@router.post("/signin", dependencies=[Depends(read_only_session)])
def signin(request: Request, session: SessionDep, form: PlainForm) -> Response:
    secret = secret_key(get_settings())
    if not csrf_ok(secret, request.cookies.get(SIGNIN_COOKIE, ""), form.get(CSRF_FIELD)):
        raise CsrfFailed
    next_url = safe_next(form.get("next"))
    key = form.get("api_key")
    try:
        if not isinstance(key, str):
            raise BrokerError("no key")
        key = key.strip()
        # The API's own rule (node keys are an agent's, never a person's).
        caller = SIGNED_IN.admit_key(key, authenticate_key(session, key))
    except BrokerError:
        return _signin_page(request, next_url, 401, "That API key is unknown or revoked.")
    account, key_id = caller.account, caller.key_id
    assert key_id is not None  # a key admitted it
    response = redirect(next_url or HOME[account.role])
    set_cookie(
        request, response, SESSION_COOKIE, web_session.issue(secret, key_id), SESSION_SECONDS
    )
    response.delete_cookie(SIGNIN_COOKIE, path="/signin")
    return response


@router.post("/signout", dependencies=[Depends(read_only_session)])
def signout(_: CheckedForm) -> Response:
    response = redirect("/signin")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
