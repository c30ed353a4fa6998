"""The job page: live progress, then the speaker timeline, talk time, transcript and downloads.

``GET /jobs/{id}/view?token=...`` is opened from the signed, expiring ``view_url`` of the job's
status, so a person needs no API key; the page's data, event stream and downloads accept the same
token. The page is three static files shipped in this package (``api_shim/static``): plain
HTML, CSS and JavaScript, no build step, nothing fetched from elsewhere (the Content-Security-
Policy says so to the browser too); its words are in the job's locale (``api_shim.page_text``).

A job that begins as a live stream (``WS /v1/stream``) has its page before it exists: the stream's
``started`` message carries the link, and while the stream runs the page follows it
(``/view/live``: the stream's messages, read from Redis as its WebSocket client gets them), drawing
a lane per speaker as finals arrive; when the stream has become its job, the page is the job's.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials

from api_shim import stream_slots
from api_shim.deps import ShimDep, bearer, require_key
from api_shim.errors import NOT_FOUND, PROTECTED_RESPONSES, TOO_MANY_STREAMS, ApiError
from api_shim.exports import MEDIA_TYPES, ExportFormat, render
from api_shim.page_text import page_locale, render_page
from api_shim.routes.events import (
    RETRY_MS,
    JobAccess,
    LiveState,
    check_page_token,
    live_state,
    open_slot,
    prepend,
    read_record,
    release,
)
from api_shim.schemas import JOB_ID_PATTERN
from api_shim.submission import visible_to
from ecg_audio import live
from ecg_audio.jobs import JobRecord, JobStatus

router = APIRouter(tags=["live"], responses=PROTECTED_RESPONSES)

ASSETS = {"view.js": "text/javascript; charset=utf-8", "view.css": "text/css; charset=utf-8"}
PAGE_HEADERS = {
    # the page loads only its own files and talks only to this shim
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    # the token is in the page's URL: it must not travel in a Referer, nor stay in a shared cache
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


@functools.cache
def static_text(name: str) -> str:
    return (resources.files("api_shim") / "static" / name).read_text(encoding="utf-8")


LIVE_POLL_S = 0.25  # how often a page's live stream looks for new messages (a short read, no held connection)
LIVE_STATUS = "live"  # the page's status while the job is still a live stream (not a job status)


@dataclass(frozen=True)
class Page:
    """What a page request sees: the job's record once the job exists, and while it is still a live
    stream (before, and for the moment it takes to become the job), that stream."""

    job_id: str
    record: JobRecord | None
    stream: live.LiveView | None


async def page_access(
    job_id: str,
    shim: ShimDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    token: Annotated[
        str | None,
        Query(max_length=200, description="The job page's signed token (from `view_url`), instead of an API key."),
    ] = None,
) -> Page:
    """The job or its live stream, for the key that owns it or a valid page token for this job (the
    same rules as ``events.authorise``: a token for another job is 403, another key's job 404)."""
    caller = None if token is not None else await require_key(shim, creds)
    rec = await read_record(shim, job_id)
    try:
        valid = re.fullmatch(JOB_ID_PATTERN, job_id)
        stream = await live.get_view(live_state(shim.settings).hub.r, job_id) if valid else None
    except redis.RedisError as e:
        raise ApiError(503, "QUEUE_UNAVAILABLE", "the job store is unavailable; retry shortly") from e
    first_run = rec.first_run if rec is not None else stream.first_run if stream is not None else 1
    check_page_token(shim, job_id, token, first_run=first_run)
    if rec is not None:
        owned = caller is None or visible_to(rec, caller)
    else:
        owned = stream is not None and (caller is None or hmac.compare_digest(stream.owner, caller.fingerprint))
    if not owned:
        raise ApiError(404, "NOT_FOUND", "no such job")
    return Page(job_id, rec, stream)


PageAccess = Annotated[Page, Depends(page_access)]


@router.get(
    "/jobs/{job_id}/view",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {}}}, **NOT_FOUND},
    summary="The job page (open the job's view_url)",
)
async def job_page(page: PageAccess, shim: ShimDep) -> HTMLResponse:
    # the job's locale, as its messages are (a live stream's is the job's to be)
    stream_locale = page.stream.locale if page.stream is not None else None
    request: dict[str, object] = (
        page.record.request if page.record is not None else {"options": {"locale": stream_locale}}
    )
    locale = page_locale(request, shim.settings.default_locale)
    return HTMLResponse(render_page(static_text("view.html"), locale), headers=PAGE_HEADERS)


@router.get("/view-assets/{name}", include_in_schema=False)
async def view_asset(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError(404, "NOT_FOUND", "no such file")
    return Response(static_text(name), media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=300"})


@router.get("/jobs/{job_id}/view/data", responses=NOT_FOUND, summary="The job page's data: status and result")
async def job_page_data(page: PageAccess, shim: ShimDep) -> JSONResponse:
    rec = page.record
    if rec is None:  # still a live stream: the page follows it (/view/live)
        job = {"job_id": page.job_id, "status": LIVE_STATUS, "progress": 0, "message": None, "stage": None}
        return JSONResponse({"job": job, "result": None, "live": True}, headers={"Cache-Control": "no-store"})
    result = None
    if rec.status == JobStatus.COMPLETED:
        envelope = await live_state(shim.settings).store.get_result(rec.job_id)
        result = envelope.get("result") if envelope else None
    job = {
        "job_id": rec.job_id,
        "status": rec.status,
        "progress": rec.progress,
        "message": rec.message,
        "stage": rec.stage,
        "error_code": rec.error_code,
        "error_message": rec.error_message,
    }
    return JSONResponse({"job": job, "result": result, "live": False}, headers={"Cache-Control": "no-store"})


@router.get(
    "/jobs/{job_id}/view/live",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The live stream's messages as Server-Sent Events"},
        204: {"description": "No live stream runs under this job id (any more): the page shows the job"},
        **NOT_FOUND,
        **TOO_MANY_STREAMS,
    },
    summary="The job page's live view: the stream's partial, final and speaker_update messages (SSE)",
)
async def job_page_live(
    page: PageAccess,
    shim: ShimDep,
    last_event_id: Annotated[str | None, Header(max_length=100, description="Resume after this message")] = None,
) -> Response:
    """The messages of ``WS /v1/stream`` that the stream's client gets (``data``: one message; ``id``:
    its Redis entry id), from the first; then ``{"type": "end", "job_id"}`` once the stream has
    become its job (``job_id`` null when it ended without one: the client left, or an error)."""
    if page.stream is None:
        return Response(status_code=204)
    slot = await open_slot(shim, page.stream.owner)  # counts among the key's event streams
    after = last_event_id if last_event_id and re.fullmatch(r"\d+-\d+", last_event_id) else "0-0"
    stream = live_messages(live_state(shim.settings), page.job_id, after, shim.settings.sse_keepalive_s, slot)
    first = await anext(stream)  # started now: its cleanup (the slot given back) runs even if never sent
    headers = {"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"}
    return StreamingResponse(prepend(first, stream), media_type="text/event-stream", headers=headers)


async def live_messages(
    state: LiveState, stream_id: str, after: str, keepalive_s: float, slot: stream_slots.Slot
) -> AsyncIterator[str]:
    """A live stream's messages as SSE frames, from the entry after ``after``, until the stream is
    over. Each look is a short ``XREAD`` without ``BLOCK``: a page holds no Redis connection while it
    waits (pages may be many, and the shim's pool is shared with the event streams)."""
    r = state.hub.r
    finished = False  # the worker's last word is out: the stream is becoming its job
    quiet_since = time.monotonic()
    try:
        yield f"retry: {RETRY_MS}\n\n"
        while True:
            reply: Any = await r.xread({live.out_key(stream_id): after}, count=100)
            for _key, entries in reply or []:
                for entry_id, fields in entries:
                    after = entry_id
                    kind = json.loads(fields["m"])["type"]
                    if kind == live.DONE:
                        finished = True
                    elif kind != live.FLUSHED:  # a realtime client's commit answered: not for the page
                        yield f"id: {entry_id}\ndata: {fields['m']}\n\n"  # one line: JSON as the worker wrote it
                quiet_since = time.monotonic()
            if reply:
                continue
            view = await live.get_view(r, stream_id)
            if view is None or finished:
                rec = await state.store.get(stream_id)
                if view is None or rec is not None:  # over: the job exists, or the stream ended without one
                    end = {"type": "end", "job_id": stream_id if rec is not None else None}
                    yield f"data: {json.dumps(end)}\n\n"
                    return
            if time.monotonic() - quiet_since >= keepalive_s:
                quiet_since = time.monotonic()
                await slot.renew()
                yield ": keep-alive\n\n"
            await asyncio.sleep(LIVE_POLL_S)
    finally:
        await release(slot)


@router.get(
    "/jobs/{job_id}/view/exports/{fmt}",
    responses={200: {"content": {t.split(";")[0]: {} for t in MEDIA_TYPES.values()}}, **NOT_FOUND},
    summary="The job page's downloads: SRT, VTT, RTTM or plain text",
)
async def job_page_export(rec: JobAccess, fmt: ExportFormat, shim: ShimDep) -> Response:
    envelope = (
        await live_state(shim.settings).store.get_result(rec.job_id) if rec.status == JobStatus.COMPLETED else None
    )
    if envelope is None or "result" not in envelope:
        raise ApiError(404, "RESULT_NOT_READY", f"the job is {rec.status}: its exports exist once it has completed")
    export = render(envelope["result"], rec.job_id, fmt)  # as GET /jobs/{id}/exports/{fmt} renders it
    return Response(
        export.text,
        media_type=export.media_type,
        headers={"Content-Disposition": f'attachment; filename="{rec.job_id}.{fmt}"', "Cache-Control": "no-store"},
    )
