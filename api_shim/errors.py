"""How the shim answers an error: one exception type for routes, one set of handlers for the app."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from api_shim.schemas import ErrorBody


class ApiError(HTTPException):
    """An error a route raises on purpose: an HTTP status, a stable machine-readable code, a message."""

    def __init__(self, status_code: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code, detail, headers)
        self.code = code


# every protected route can answer these; documented so clients (and schema checks) know their shape
PROTECTED_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No API key"},
    403: {"model": ErrorBody, "description": "API key not accepted"},
    413: {"model": ErrorBody, "description": "Request body too large"},
    422: {"model": ErrorBody, "description": "The request is malformed or not accepted; `detail` says why"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "No such job"}}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {503: {"model": ErrorBody, "description": "Try again shortly"}}


def printable(text: str) -> str:
    """Text safe to put in a JSON response: lone surrogates (from a hostile JSON key) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # neither the input nor pydantic's ctx is echoed; a loc can hold a client's JSON key, so it is escaped
    errors = [
        {
            "loc": [printable(str(p))[:200] for p in e.get("loc", ())],
            "msg": printable(str(e.get("msg", "")))[:300],
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()[:20]
    ]
    return JSONResponse(status_code=422, content={"detail": errors})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
