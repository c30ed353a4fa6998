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
    """Refuse request bodies past their cap (413) while they arrive.

    Job requests (every route but the media ones) are capped at ``max_bytes``: a declared
    Content-Length over it is refused before a byte is read; a chunked body is buffered up to the
    cap and refused as soon as it passes it, so no route ever parses more. Media routes
    (``media``: a path, or a prefix ending in ``/``, and its cap) stream their body: the count
    runs in the ``receive`` the route reads from, so a chunked upload (no Content-Length) is stopped at the cap
    wherever it is being read, by the upload route's own loop or by the multipart parser that
    would otherwise spool a body of any size to disk first.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, media: dict[str, int]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.media = media

    def _media_cap(self, path: str) -> int | None:
        if path in self.media:
            return self.media[path]
        return next((cap for p, cap in self.media.items() if p.endswith("/") and path.startswith(p)), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self._media_cap(scope["path"])
        if cap is not None:
            await self.app(scope, _capped(receive, cap), send)
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


def _capped(receive: Receive, max_bytes: int) -> Receive:
    """``receive`` that raises a 413 ``ApiError`` once more than ``max_bytes`` of body have come in
    (raised inside the route that reads, so the error handlers answer it as problem+json)."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > max_bytes:
            from api_shim.errors import ApiError

            raise ApiError(413, "PAYLOAD_TOO_LARGE", f"upload larger than {max_bytes} bytes")
        return message

    return counted
