"""Routes whose well-formed requests skip FastAPI's per-request work.

FastAPI's handler solves a route's dependencies (headers, security, body, the
database) and validates its answer again on every request: for the busiest
routes (``POST /v1/jobs``, ``GET /v1/offers``), more CPU than their own work. A
shortcut reads what the route declares itself and answers as FastAPI would;
where it cannot tell (no key, a malformed header, body or query), it gives None
and FastAPI's handler answers, so errors come in the same order and shape. The
route is declared as usual, so its OpenAPI schema is unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

Shortcut = Callable[[Request], Awaitable[Response | None]]


def shortcut_route(shortcut: Shortcut) -> type[APIRoute]:
    """An ``APIRoute`` class (for ``route_class_override``) whose requests
    ``shortcut`` answers, those it gives None for FastAPI's own handler."""

    class ShortcutRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            declared = super().get_route_handler()

            async def handle(request: Request) -> Response:
                response = await shortcut(request)
                return response if response is not None else await declared(request)

            return handle

    return ShortcutRoute
