"""One error base for the whole API, and the handlers that render it.

Every error response has the same shape::

    {"error": {"code": "not_found", "message": "...", "field": "body.price_per_hour"}}

``code`` is stable and machine-readable, ``message`` is for people, and
``field`` (or null) names the input at fault.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class BrokerError(Exception):
    """Base of every error the API reports on purpose."""

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class NotFound(BrokerError):
    status_code = 404
    code = "not_found"


class Unauthorized(BrokerError):
    status_code = 401
    code = "unauthorized"


class Forbidden(BrokerError):
    status_code = 403
    code = "forbidden"


class Conflict(BrokerError):
    status_code = 409
    code = "conflict"


class InvalidInput(BrokerError):
    status_code = 422
    code = "validation_error"


class FieldError(BaseModel):
    field: str = Field(description="Where: body.count, query.limit, path.job_id, ...")
    message: str
    type: str = Field(description="pydantic's error type, e.g. greater_than_equal")


class ErrorDetail(BaseModel):
    code: str = Field(
        description="Stable and machine-readable: validation_error, unauthorized, forbidden, "
        "not_found, conflict, too_large, ..."
    )
    message: str = Field(description="For people: what is wrong and what to do")
    field: str | None = Field(description="The input at fault, if one is")
    details: list[FieldError] | None = Field(
        default=None, description="validation_error: every input at fault"
    )


class ErrorOut(BaseModel):
    """The shape of every error response."""

    error: ErrorDetail


# Every operation documents its errors with this one shape (FastAPI would otherwise
# describe 422 as its own HTTPValidationError, which the broker never sends).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorOut, "description": "Refused: `error.code` says why"},
    "5XX": {"model": ErrorOut, "description": "The broker or a service it needs failed"},
}


def error_body(code: str, message: str, field: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field, **extra}}


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc)


def _clean(message: str) -> str:
    # pydantic prefixes messages of custom validators with "Value error, ".
    return message.removeprefix("Value error, ")


def _detail(error: dict[str, Any]) -> dict[str, Any]:
    if error["type"] == "json_invalid":
        # FastAPI puts the character offset in the location: ("body", 17).
        reason = error.get("ctx", {}).get("error", "cannot be parsed")
        message = f"the body is not valid JSON: {reason} (character {error['loc'][-1]})"
        return {"field": "body", "message": message, "type": error["type"]}
    return {
        "field": _field_path(error["loc"]),
        "message": _clean(error["msg"]),
        "type": error["type"],
    }


def install_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every failure into the one error shape."""

    @app.exception_handler(BrokerError)
    async def _broker_error(request: Request, exc: BrokerError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse(
            error_body(exc.code, exc.message, exc.field), exc.status_code, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [_detail(e) for e in exc.errors()]
        field = details[0]["field"] if details else None
        message = f"{field}: {details[0]['message']}" if details else "invalid request"
        return JSONResponse(error_body("validation_error", message, field, details=details), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            # Bodies json cannot parse at all (bad UTF-8, absurd nesting or numbers).
            message = "the body is not valid JSON that the broker can read"
            return JSONResponse(error_body("validation_error", message, "body"), 422)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(DBAPIError)
    async def _database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        # PostgreSQL gave up one of two transactions that waited on each other
        # (deadlock) or could not serialise them: nothing was written, and the
        # same request can simply be sent again.
        if getattr(exc.orig, "sqlstate", None) in ("40P01", "40001"):
            return JSONResponse(
                error_body("retry", "the database was busy with a conflicting change; retry"),
                503,
                headers={"Retry-After": "1"},
            )
        return await _unexpected(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("internal_error", "The broker hit an unexpected error; it was logged."),
            500,
        )
