"""The FastAPI application: routers, error handlers and health checks."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import text

from broker.accounts.router import router as accounts_router
from broker.db import SessionDep
from broker.errors import error_body, install_handlers
from broker.jobs.router import router as jobs_router
from broker.limits import BodySizeLimit
from broker.market.router import router as market_router
from broker.offers.router import router as offers_router

DESCRIPTION = """
The compute broker's API. Providers list accelerator capacity as **offers**
(asks); developers submit **jobs** (bids); the market clears them in rounds.

Authenticate with an API key: `Authorization: Bearer bk_...` (create one with
`broker accounts create NAME --role developer|provider|admin`).
Money is US dollars as decimal strings, exact to the micro-dollar. Errors
always have the shape `{"error": {"code", "message", "field"}}`.
"""


def create_app() -> FastAPI:
    app = FastAPI(title="Compute Broker", version="0.1.0", description=DESCRIPTION)
    install_handlers(app)
    app.add_middleware(BodySizeLimit)
    for router in (accounts_router, offers_router, jobs_router, market_router):
        app.include_router(router)

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: the database answers",
        responses={503: {"description": "The database does not answer"}},
    )
    def readyz(session: SessionDep) -> Any:
        try:
            session.execute(text("SELECT 1"))
        except Exception:
            return JSONResponse(error_body("not_ready", "the database does not answer"), 503)
        return {"status": "ok"}

    # Some probes use HEAD; answer it without a second entry in the API description.
    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)
    return app


app = create_app()
