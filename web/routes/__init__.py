"""The dashboard's routes, one module per area of the site."""

from __future__ import annotations

from fastapi import APIRouter

from web.routes import admin, auth, billing, jobs, keys, market, provider, services

router = APIRouter(include_in_schema=False)
for area in (auth, market, jobs, services, provider, billing, admin, keys):
    router.include_router(area.router)
