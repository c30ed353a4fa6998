"""How the shim answers an error: RFC 9457 problem details, one shape for every 4xx and 5xx.

Every error body is ``application/problem+json``::

    {"type": "about:blank", "title": "Not Found", "status": 404, "code": "NOT_FOUND",
     "detail": "no such job", "instance": "/jobs/x"}

``code`` is stable and machine-readable (the job error codes where they apply:
``DOWNLOAD_ERROR``, ``UNSUPPORTED_OPTION`` …); ``detail`` is what a person reads. Under ``/v1/``
(the OpenAI-compatible routes) the body also carries OpenAI's ``error`` object, for its clients. It is the
field the backend has always read: a string, or for a malformed request (422
``VALIDATION_ERROR``) FastAPI's list of ``{loc, msg, type}``, kept for the clients that parse it.

Routes raise ``ApiError(status, code, detail)``; anything else (Starlette's 404/405, the body
cap's 413, an unexpected exception) is mapped here, so no error leaves in another shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = structlog.get_logger("ecg.shim")

PROBLEM_JSON = "application/problem+json"
OPENAI_PREFIX = "/v1/"

# the code of an error that no route named
DEFAULT_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "VALIDATION_ERROR",
    500: "INTERNAL_ERROR",
    503: "UNAVAILABLE",
}


class Problem(BaseModel):
    """RFC 9457 problem details, with the shim's stable ``code``."""

    type: str = Field("about:blank", description="about:blank: the status and title say it all")
    title: str = Field(..., description="The HTTP status phrase")
    status: int
    code: str = Field(..., description="Stable machine-readable code, e.g. NOT_FOUND, JOB_ID_CONFLICT, DOWNLOAD_ERROR")
    detail: Any = Field(None, description="What a person reads (for VALIDATION_ERROR, the list of problems)")
    instance: str | None = Field(None, description="The request path")


class ApiError(HTTPException):
    """An error a route raises on purpose: an HTTP status, a stable machine-readable code, a message."""

    def __init__(self, status_code: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code, detail, headers)
        self.code = code


def problem_response(
    status: int, code: str, detail: Any, *, instance: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body = {"type": "about:blank", "title": title, "status": status, "code": code, "detail": detail}
    if instance is not None:
        body["instance"] = instance
        if instance.startswith(OPENAI_PREFIX):
            # an extension member in OpenAI's error shape, which OpenAI clients read (message, code)
            body["error"] = {
                "message": detail if isinstance(detail, str) else title,
                "type": "invalid_request_error" if status < 500 else "server_error",
                "param": None,
                "code": code,
            }
    return JSONResponse(status_code=status, content=body, headers=headers, media_type=PROBLEM_JSON)


def problem_doc(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_JSON: {"schema": Problem.model_json_schema()}}}


# every protected route can answer these; documented so clients (and schema checks) know their shape
PROTECTED_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: problem_doc("No API key"),
    403: problem_doc("API key not accepted"),
    413: problem_doc("Request body too large"),
    422: problem_doc("The request is malformed or not accepted; `detail` says why"),
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: problem_doc("No such job (or another API key's job)")}
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: problem_doc("The job_id is taken by another request; `detail` names what differs")
}
TOO_MANY_STREAMS: dict[int | str, dict[str, Any]] = {
    429: problem_doc("The API key holds ECG_MAX_STREAMS_PER_KEY event streams open already (Retry-After)")
}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: problem_doc("Try again shortly (after Retry-After seconds where it is given)")
}


def printable(text: str) -> str:
    """Text safe to put in a JSON response: lone surrogates (from a hostile JSON key) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = getattr(exc, "code", None) or DEFAULT_CODES.get(exc.status_code, f"HTTP_{exc.status_code}")
    return problem_response(
        exc.status_code, code, exc.detail, instance=printable(request.url.path)[:300], headers=exc.headers
    )


async def _validation(request: Request, exc: Exception) -> JSONResponse:
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
    return problem_response(422, "VALIDATION_ERROR", errors, instance=printable(request.url.path)[:300])


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled_error", error=type(exc).__name__, path=request.url.path[:200])
    return problem_response(500, "INTERNAL_ERROR", "an internal error; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
