"""Rendering: the Jinja2 templates, the context every page gets, and HTML error pages."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from broker.errors import BrokerError
from broker.models.account import Role
from web.format import FILTERS
from web.session import CSRF_FIELD, SESSION_COOKIE, SignInRequired, WebUser

HERE = Path(__file__).resolve().parent


def query(params: dict[str, Any], **changes: Any) -> str:
    """A query string from ``params`` with ``changes``, leaving out empty values."""
    merged = {**params, **changes}
    return urlencode({k: v for k, v in merged.items() if v not in ("", None, 0)})


templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters.update(FILTERS)
templates.env.globals.update(CSRF_FIELD=CSRF_FIELD, query=query)

# No CDN and no inline script or style: everything the pages use is served by the
# app, which this policy enforces in the browser.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

# What each role finds in the menu: (path, label). Admins see everything.
NAV = {
    Role.developer: [
        ("/market", "Market"),
        ("/jobs", "My jobs"),
        ("/jobs/new", "New bid"),
        ("/services", "Services"),
        ("/invoices", "Invoices"),
        ("/keys", "API keys"),
    ],
    Role.provider: [
        ("/market", "Market"),
        ("/nodes", "My nodes"),
        ("/offers", "My offers"),
        ("/earnings", "Earnings"),
        ("/keys", "API keys"),
    ],
    Role.admin: [
        ("/market", "Market"),
        ("/jobs", "Jobs"),
        ("/services", "Services"),
        ("/nodes", "Nodes"),
        ("/offers", "Offers"),
        ("/invoices", "Invoices"),
        ("/earnings", "Earnings"),
        ("/admin", "Admin"),
        ("/keys", "API keys"),
    ],
}

HOME = {Role.developer: "/jobs", Role.provider: "/offers", Role.admin: "/market"}


def page(
    request: Request,
    template: str,
    user: WebUser | None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    """A full page. ``user`` None is a page seen signed out (sign-in, some errors)."""
    response = templates.TemplateResponse(
        request,
        template,
        {
            # Templates see plain values, never ORM rows: an error page is drawn
            # after the request's transaction rolled back.
            "account": user.viewer if user else None,
            "csrf": user.csrf if user else None,
            "nav": NAV[user.viewer.role] if user else [],
            "path": request.url.path,
            **context,
        },
        status_code=status_code,
    )
    response.headers.update(SECURITY_HEADERS)
    return response


def redirect(url: str, **params: str) -> RedirectResponse:
    """After a form succeeded: see the result with a GET (303), never a resubmit."""
    target = f"{url}?{urlencode(params)}" if params else url
    return RedirectResponse(target, status_code=303)


def error_page(request: Request, user: WebUser | None, status: int, message: str) -> HTMLResponse:
    titles = {403: "Not allowed", 404: "Not found", 409: "Conflict", 422: "Not accepted"}
    return page(
        request,
        "error.html",
        user,
        status_code=status,
        title=titles.get(status, "Something went wrong"),
        message=message,
    )


def form_errors(error: ValidationError | BrokerError) -> dict[str, str]:
    """Messages by form field, from a schema's validation or a service's refusal."""
    if isinstance(error, BrokerError):
        field = (error.field or "").removeprefix("body.") or "_form"
        return {field: error.message}
    errors: dict[str, str] = {}
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else "_form"
        errors.setdefault(field, str(item["msg"]).removeprefix("Value error, "))
    return errors


class WebError(Exception):
    """A refusal shown as an HTML page (the API answers the same refusal in JSON)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class WebRoute(APIRoute):
    """A dashboard route: a service's refusal (BrokerError) or a malformed path or
    query becomes a WebError, rendered as a page. It is re-raised, not returned, so
    the request's transaction still rolls back as it does for the API."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except BrokerError as e:
                raise WebError(e.status_code, e.message) from e
            except RequestValidationError as e:
                first = e.errors()[0] if e.errors() else {}
                where = ".".join(str(part) for part in first.get("loc", ()))
                raise WebError(422, f"{where}: {first.get('msg', 'invalid request')}") from e

        return handle


def _user(request: Request) -> WebUser | None:
    user = getattr(request.state, "web_user", None)
    return user if isinstance(user, WebUser) else None


async def on_web_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, WebError)
    return error_page(request, _user(request), exc.status, exc.message)


async def on_csrf_failed(request: Request, exc: Exception) -> Response:
    message = "This form has expired or did not come from this site. Reload the page and try again."
    return error_page(request, _user(request), 403, message)


async def on_sign_in_required(request: Request, exc: Exception) -> Response:
    """To the sign-in page, and back here after. htmx requests (polling, boosted
    links) are told to navigate there, rather than swap the form into the page."""
    assert isinstance(exc, SignInRequired)
    target = "/signin?" + urlencode({"next": exc.next_url}) if exc.next_url else "/signin"
    response: Response
    if request.headers.get("HX-Request"):
        response = Response(status_code=204, headers={"HX-Redirect": target})
    else:
        response = RedirectResponse(target, status_code=303)
    if request.cookies.get(SESSION_COOKIE):
        response.delete_cookie(SESSION_COOKIE, path="/")
    return response
