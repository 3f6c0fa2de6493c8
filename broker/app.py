"""The FastAPI application: routers, error handlers and health checks."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy import text

from broker import periodic
from broker.accounts.router import router as accounts_router
from broker.allocations.router import router as runs_router
from broker.billing.router import router as billing_router
from broker.blobs.router import router as blobs_router
from broker.buckets import DatabaseBuckets, MemoryBuckets
from broker.config import get_settings
from broker.db import SessionDep, get_engine
from broker.errors import ERROR_RESPONSES, ErrorOut, error_body, install_handlers
from broker.jobs.router import router as jobs_router
from broker.limits import BodySizeLimit
from broker.market.cache import BookCache
from broker.market.router import router as market_router
from broker.nodes.router import router as nodes_router
from broker.observability import (
    RequestContext,
    check_metrics_access,
    configure_logging,
    metrics_text,
)
from broker.offers.router import router as offers_router
from broker.ratelimit import RateLimit
from broker.services.gateway import write_windows
from broker.services.router import replicas_router
from broker.services.router import router as services_router
from web import install as install_web

log = logging.getLogger(__name__)


class Health(BaseModel):
    status: Literal["ok"]


DESCRIPTION = """
The compute broker's API. Providers list accelerator capacity as **offers**
(asks); developers submit **jobs** (bids); the market clears them in rounds.

Authenticate with an API key: `Authorization: Bearer bk_...` (create one with
`broker accounts create NAME --role developer|provider|admin`).
Money is US dollars as decimal strings, exact to the micro-dollar. Errors
always have the shape `{"error": {"code", "message", "field"}}`.
"""


def tune_for_serving() -> None:
    """Settings of the Python interpreter for a worker process that serves requests.

    - The garbage collector: everything alive once the app has started (the app,
      its routes, SQLAlchemy's and pydantic's machinery, about 200,000 objects) is
      moved out of its reach (``gc.freeze``), and it runs a tenth as often. A full
      collection over those objects stopped a worker for 170 to 210 ms at a time
      under load (measured with ``gc.callbacks``); each request makes thousands of
      short-lived objects, which a young collection still frees.
    - The thread switch interval: 0.5 ms instead of 5. A worker's database work
      runs in threads; a thread whose answer from the database has arrived waits
      for the event loop to let go of the interpreter, up to the interval, once per
      round trip.
    """
    sys.setswitchinterval(0.0005)
    gc.collect()
    gc.freeze()
    gc.set_threshold(7_000, 10, 10)


def create_app(
    auto_clear: bool | None = None, auto_bill: bool | None = None, *, served: bool = False
) -> FastAPI:
    """The API. While it is served, its periodic tasks (``broker.periodic``) run in
    the background: ``auto_clear`` (default: BROKER_CLEAR_INTERVAL_SECONDS > 0)
    clearing rounds; ``auto_bill`` (default: BROKER_BILLING_INTERVAL_SECONDS > 0),
    billing passes; node sweeps always. ``served``: a ``broker serve`` worker
    process, whose interpreter is tuned at startup (``tune_for_serving``) and which
    runs no periodic task (the scheduler process does)."""
    settings = get_settings()
    interval = settings.clear_interval_seconds
    clearing = interval > 0 if auto_clear is None else auto_clear
    if clearing and interval <= 0:
        settings = settings.model_copy(update={"clear_interval_seconds": 10.0})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if os.environ.get("BROKER_CONFIGURE_LOGGING") == "1":  # set by `broker serve`
            configure_logging(get_settings().log_format)
        windows = asyncio.create_task(write_windows(app))
        if served:
            tune_for_serving()
            yield  # the periodic tasks run in broker serve's scheduler process
            windows.cancel()
            return
        # Served some other way (tests, `uvicorn broker.app:app`): the periodic tasks
        # run here, in threads, once per database at a time like everywhere else.
        scheduler = periodic.scheduler(settings, clearing=clearing, billing=auto_bill is not False)
        scheduler.start()
        yield
        windows.cancel()
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(
        title="Compute Broker",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
        # /docs is served below from the dashboard's static files, never from a CDN,
        # so it works offline; ReDoc (CDN only) is not served.
        docs_url=None,
        redoc_url=None,
    )
    install_handlers(app)
    app.state.book_cache = BookCache(settings.book_cache_seconds)
    app.add_middleware(
        BodySizeLimit,
        per_path={
            "/v1/artifacts": settings.max_artifact_bytes,
            "/v1/arrays": settings.max_arrays_bytes,
        },
    )
    app.add_middleware(
        RateLimit,
        rate=settings.rate_limit_per_second,
        burst=settings.rate_limit_burst,
        anonymous_rate=settings.rate_limit_anonymous_per_second,
        anonymous_burst=settings.rate_limit_anonymous_burst,
        buckets=DatabaseBuckets(get_engine) if settings.shared_rate_limits else MemoryBuckets(),
    )
    # Outermost: every answer, a 413 or a 429 too, carries the request id and is counted.
    app.add_middleware(RequestContext)
    # The busiest routes first: FastAPI matches a request against each included
    # router's routes in turn, and a miss costs about 5 us a route.
    for router in (
        jobs_router,
        offers_router,
        market_router,
        accounts_router,
        blobs_router,
        runs_router,
        nodes_router,
        billing_router,
        services_router,
        replicas_router,
    ):
        app.include_router(router)

    @app.get("/docs", include_in_schema=False)
    def api_reference() -> HTMLResponse:
        """Swagger UI from web/static/swagger-ui (vendored: web/static/SOURCES.md)."""
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="Compute Broker API",
            swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
        )

    @app.get(
        "/healthz",
        response_model=Health,
        tags=["health"],
        summary="Liveness: the process answers",
    )
    def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Health,
        tags=["health"],
        summary="Readiness: the database answers",
        responses={503: {"model": ErrorOut, "description": "The database does not answer"}},
    )
    def readyz(session: SessionDep) -> Any:
        try:
            session.execute(text("SELECT 1"))
        except Exception:
            return JSONResponse(error_body("not_ready", "the database does not answer"), 503)
        return Health(status="ok")

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request, session: SessionDep) -> Response:
        """Prometheus' text format (see broker.observability): for the metrics token or
        this machine; the session opens no connection unless the figures are stale."""
        client = request.client.host if request.client else None
        check_metrics_access(client, request.headers.get("authorization"))
        body, content_type = metrics_text(session, get_settings().metrics_cache_seconds)
        return Response(body, media_type=content_type)

    # Some probes use HEAD; answer it without a second entry in the API description.
    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)
    install_web(app)  # the dashboard, at / (the API stays under /v1)
    return app


def create_served_app() -> FastAPI:
    """The app as ``broker serve``'s workers run it: periodic tasks run in a process
    of their own (``broker.periodic.main``), not in the workers. A worker dies
    at once with the process that started it, so none is left serving the port."""
    import signal

    from broker.supervise import die_with_parent

    die_with_parent(signal.SIGKILL)
    return create_app(auto_clear=False, served=True)


app = create_app()
