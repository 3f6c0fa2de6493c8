"""The web dashboard: server-rendered pages over the broker's own services.

``web`` renders and handles forms; every rule (who may see what, what a job or
an offer may become) is the ``broker`` services', the same ones the API calls.
"""

from __future__ import annotations

import inspect

from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from web.render import (
    HERE,
    WebError,
    _user,
    error_page,
    on_csrf_failed,
    on_sign_in_required,
    on_web_error,
)
from web.session import CsrfFailed, SignInRequired


def install(app: FastAPI) -> None:
    """Serve the dashboard at ``/`` and its scripts and styles at ``/static``."""
    from web.routes import router

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    api_errors = app.exception_handlers[StarletteHTTPException]

    async def not_found(request: Request, exc: Exception) -> Response:
        """A page that does not exist answers a page, for a browser; the API (and any
        client that does not ask for HTML) keeps its JSON error."""
        assert isinstance(exc, StarletteHTTPException)
        browser = "text/html" in request.headers.get("accept", "")
        if exc.status_code in (404, 405) and browser and not request.url.path.startswith("/v1/"):
            message = (
                "There is no page at this address."
                if exc.status_code == 404
                else ("This page does not take that request.")
            )
            return error_page(request, _user(request), exc.status_code, message)
        answer = api_errors(request, exc)
        return await answer if inspect.isawaitable(answer) else answer

    app.add_exception_handler(StarletteHTTPException, not_found)
    app.add_exception_handler(SignInRequired, on_sign_in_required)
    app.add_exception_handler(CsrfFailed, on_csrf_failed)
    app.add_exception_handler(WebError, on_web_error)
