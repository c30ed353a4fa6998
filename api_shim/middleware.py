"""ASGI middleware: the request body cap."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UPLOAD_PATH = "/api/uploads"
# Job requests are small JSON documents; anything bigger is a mistake or an attack.
MAX_JSON_BODY_BYTES = 64 * 1024


def _send_413(max_bytes: int) -> JSONResponse:
    from api_shim.errors import problem_response

    return problem_response(
        413,
        "PAYLOAD_TOO_LARGE",
        f"request body larger than {max_bytes} bytes ({max_bytes // 1024} KiB): job requests are "
        f"small JSON documents; send media with POST {UPLOAD_PATH}",
    )


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` (413) on every route but the streamed upload.

    A declared Content-Length over the cap is refused before a byte is read; a chunked body is
    buffered up to the cap and refused as soon as it passes it, so no route ever parses more.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, exempt_paths: frozenset[str], exempt_prefixes: tuple[str, ...] = ()
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt_paths = exempt_paths
        self.exempt_prefixes = exempt_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in self.exempt_paths or path.startswith(self.exempt_prefixes):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_413(self.max_bytes)(scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = bool(message.get("more_body", False))
            if len(body) > self.max_bytes:
                await _send_413(self.max_bytes)(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
