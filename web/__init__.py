"""The web dashboard: server-rendered pages over the broker's own services.

``web`` renders and handles forms; every rule (who may see what, what a job or
an offer may become) is the ``broker`` services', the same ones the API calls.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from web.render import (
    HERE,
    WebError,
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
    app.add_exception_handler(SignInRequired, on_sign_in_required)
    app.add_exception_handler(CsrfFailed, on_csrf_failed)
    app.add_exception_handler(WebError, on_web_error)
