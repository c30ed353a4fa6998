"""A job's events as Server-Sent Events: every progress milestone, then the final event.

The events are the job's event log (``ecg_audio.event_log``, a Redis Stream), the same events
the callbacks carry, under the same ids: each SSE message's ``id:`` is the callback event id, its
``data:`` the callback body. A client that reconnects with ``Last-Event-ID`` gets what came after
that event, nothing twice; the stream ends after the final event (a reconnect after it answers
204, which tells a browser's ``EventSource`` to stop). A quiet stream sends a keep-alive comment
every ``ECG_SSE_KEEPALIVE_S``.

Each open stream is one coroutine waiting on a queue; one task per process reads every followed
job's log with a single ``XREAD BLOCK`` (``event_log.EventHub``): no thread, and no Redis
connection, per stream.

Access: an API key, or the job page's signed ``token`` (``api_shim.view_tokens``) for that job.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import redis
import redis.asyncio
from fastapi import APIRouter, Depends, Header, Query, Response, WebSocket, WebSocketDisconnect, status
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials

from api_shim import stream_slots
from api_shim.deps import Shim, ShimDep, bearer, require_key
from api_shim.errors import NOT_FOUND, PROTECTED_RESPONSES, TOO_MANY_STREAMS, UNAVAILABLE, ApiError, problem_response
from api_shim.schemas import JOB_ID_PATTERN
from api_shim.submission import visible_to
from api_shim.view_tokens import check_token, view_secret
from ecg_audio import event_log
from ecg_audio.event_log import Event
from ecg_audio.jobs import TERMINAL, AsyncJobStore, JobRecord, JobStatus
from ecg_audio.settings import Settings

router = APIRouter(tags=["live"], responses=PROTECTED_RESPONSES)

RETRY_MS = 2000  # how soon a browser reconnects after a dropped stream
# A job that ended without a final event in its log (cancelled through the API; finished before
# the log existed) gets one made from its record, once the record has been terminal this long: the
# worker appends its own final event a moment after it marks the record, and that one must win.
FINAL_GRACE_S = 5.0
# a stream renews its slot at every keep-alive; a slot left by a shim that died lapses after this many
SLOT_LEASE_KEEPALIVES = 3


async def job_access(
    job_id: str,
    shim: ShimDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    token: Annotated[
        str | None,
        Query(max_length=200, description="The job page's signed token (from `view_url`), instead of an API key."),
    ] = None,
) -> JobRecord:
    """The job's record, for the API key that made the job or a valid page token for this job."""
    return await authorise(shim, job_id, creds, token)


async def authorise(
    shim: Shim, job_id: str, creds: HTTPAuthorizationCredentials | None, token: str | None
) -> JobRecord:
    caller = None if token is not None else await require_key(shim, creds)
    rec = await read_record(shim, job_id)
    # a link names the job it was made for: one to a purged job does not open a job re-created under its id
    check_page_token(shim, job_id, token, first_run=rec.first_run if rec is not None else 1)
    # with a key, another key's job does not exist (as everywhere in the shim); a token names its job
    if rec is None or (caller is not None and not visible_to(rec, caller)):
        raise ApiError(404, "NOT_FOUND", "no such job")
    return rec


async def read_record(shim: Shim, job_id: str) -> JobRecord | None:
    try:
        return await live_state(shim.settings).store.get(job_id) if re.fullmatch(JOB_ID_PATTERN, job_id) else None
    except redis.RedisError as e:
        raise ApiError(503, "QUEUE_UNAVAILABLE", "the job store is unavailable; retry shortly") from e


def check_page_token(shim: Shim, job_id: str, token: str | None, *, first_run: int) -> None:
    """403 for a page token that was not made for this job (``first_run``: the job's) or has expired."""
    if token is not None and not check_token(view_secret(shim.settings), job_id, token, first_run=first_run):
        raise ApiError(
            status.HTTP_403_FORBIDDEN,
            "VIEW_LINK_INVALID",
            "this job page link is not valid or has expired; ask for the job's current view_url",
        )


JobAccess = Annotated[JobRecord, Depends(job_access)]

# connections for the followers' own reads (backlog, record look-ups); a burst of new streams
# waits for one rather than failing (redis-py's asyncio pool holds 100 and raises past that). The
# hub's blocked read holds just one more.
STREAM_POOL_CONNECTIONS = 32


class LiveState:
    """Per event loop: the hub and the job store that the event streams and the page read through."""

    def __init__(self, settings: Settings) -> None:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=STREAM_POOL_CONNECTIONS,
            timeout=30,
            decode_responses=True,
            socket_timeout=10,
            socket_connect_timeout=5,
        )
        client = redis.asyncio.Redis(connection_pool=pool)
        self.hub = event_log.EventHub(client)
        self.store = AsyncJobStore(client, settings.job_ttl_s)


_live: dict[tuple[int, str], tuple[asyncio.AbstractEventLoop, LiveState]] = {}


def live_state(settings: Settings) -> LiveState:
    """The running loop's ``LiveState`` (uvicorn runs one loop; a test client may start several)."""
    loop = asyncio.get_running_loop()
    slot = (id(loop), settings.redis_url)
    found = _live.get(slot)
    if found is None or found[0] is not loop:
        found = _live[slot] = (loop, LiveState(settings))
    return found[1]


def sse_frame(ev: event_log.Event) -> str:
    data = json.dumps(ev.payload, ensure_ascii=False, separators=(",", ":"))  # one line: JSON escapes newlines
    return f"id: {ev.event_id}\ndata: {data}\n\n"


async def _emit_final(store: AsyncJobStore, rec: JobRecord) -> bool:
    """The final event ``rec`` calls for, through the one event builder (into the log every reader
    follows, and the callback outbox). False when nothing more will come: the record says its final
    event went out already, yet the log lost it."""
    result = None
    if rec.status == JobStatus.COMPLETED:
        envelope = await store.get_result(rec.job_id)
        result = envelope.get("result") if envelope else None
    code, _ = await store.events.finish(
        rec.job_id,
        JobStatus(rec.status),
        stage=rec.stage,
        message=rec.message,
        progress=rec.progress,
        error_code=rec.error_code,
        error_message=rec.error_message,
        result=result,
        run=rec.run,
    )
    return code not in (0, -1)


async def followed(live: LiveState, sub: event_log.Subscription, keepalive_s: float) -> AsyncIterator[Event | None]:
    """A subscription's events, ``None`` after each quiet ``keepalive_s``; ends after the final event,
    or when the job is forgotten. A job that ended without a final event in its log gets one."""
    job_id = sub.stream[len(event_log.KEY_PREFIX) : -len(event_log.KEY_SUFFIX)]
    async for ev in sub.events(idle_s=keepalive_s):
        yield ev
        if ev is not None:
            continue
        rec = await live.store.get(job_id)
        if rec is None:  # the job was forgotten (expired, purged): nothing more will come
            return
        if (
            rec.status in TERMINAL
            and time.time() - rec.updated_at > FINAL_GRACE_S
            and not await _emit_final(live.store, rec)
        ):
            return


async def event_stream(
    live: LiveState, job_id: str, last_event_id: str | None, keepalive_s: float, slot: stream_slots.Slot
) -> AsyncIterator[str]:
    try:
        sub = await live.hub.subscribe(job_id, last_event_id=last_event_id)
    except BaseException:
        await release(slot)
        raise
    try:
        yield f"retry: {RETRY_MS}\n\n"
        async for ev in followed(live, sub, keepalive_s):
            if ev is None:
                await slot.renew()
            yield ": keep-alive\n\n" if ev is None else sse_frame(ev)
    finally:
        sub.close()
        await release(slot)


async def release(slot: stream_slots.Slot) -> None:
    """Give the slot back, even from a handler being cancelled (server shutdown, a test client)."""
    with anyio.CancelScope(shield=True):
        try:
            await slot.release()
        except redis.RedisError:
            pass  # it lapses with its lease


async def open_slot(shim: Shim, owner: str | None) -> stream_slots.Slot:
    """The stream's slot among its key's (``ECG_MAX_STREAMS_PER_KEY``), or 429. ``owner``: the key
    fingerprint of the job (or live stream) it follows."""
    settings = shim.settings
    try:
        slot = await stream_slots.acquire(
            live_state(settings).hub.r,
            owner or "unowned",
            settings.max_streams_per_key,
            lease_s=SLOT_LEASE_KEEPALIVES * settings.sse_keepalive_s + 10,
        )
    except redis.RedisError as e:
        raise ApiError(503, "QUEUE_UNAVAILABLE", "the job store is unavailable; retry shortly") from e
    if slot is None:
        raise ApiError(
            429,
            "TOO_MANY_STREAMS",
            f"this API key already has {settings.max_streams_per_key} event streams open; close one first",
            headers={"Retry-After": str(int(settings.sse_keepalive_s))},
        )
    return slot


async def prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    """``first``, then ``rest``: a stream whose first step has already run."""
    yield first
    async for chunk in rest:
        yield chunk


@router.get(
    "/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The job's events as Server-Sent Events"},
        204: {"description": "The client has already seen the final event (Last-Event-ID): nothing more will come"},
        **NOT_FOUND,
        **TOO_MANY_STREAMS,
        **UNAVAILABLE,
    },
    summary="Live progress: the job's events (SSE), ids = callback event ids",
)
async def job_events(
    rec: JobAccess,
    shim: ShimDep,
    last_event_id: Annotated[
        str | None, Header(max_length=300, description="Resume after this event (browsers send it on reconnect)")
    ] = None,
) -> Response:
    if last_event_id and event_log.is_final(last_event_id):
        last = await event_log.last_event_async(live_state(shim.settings).hub.r, rec.job_id)
        if last is not None and last.event_id == last_event_id:
            # the client has the job's last word; after a requeue (a later run) it would get the new events
            return Response(status_code=204)
    slot = await open_slot(shim, rec.owner)
    stream = event_stream(live_state(shim.settings), rec.job_id, last_event_id, shim.settings.sse_keepalive_s, slot)
    # its first step (read the backlog, subscribe) runs now: a client that sees the stream open is
    # already following, and a Redis failure is an error status, not a broken stream. Once started,
    # the generator's cleanup (unsubscribing) runs even if the answer is never sent.
    try:
        first = await anext(stream)
    except redis.RedisError as e:
        raise ApiError(503, "QUEUE_UNAVAILABLE", "the job store is unavailable; retry shortly") from e
    # no-transform/X-Accel-Buffering: proxies must pass each event on as it comes, not buffer the stream
    headers = {"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"}
    return StreamingResponse(prepend(first, stream), media_type="text/event-stream", headers=headers)


@router.websocket("/jobs/{job_id}/events/ws")
async def job_events_ws(
    websocket: WebSocket, job_id: str, token: str | None = None, last_event_id: str | None = None
) -> None:
    """The same events over a WebSocket: one text message per event, ``{"id": event id, "data": payload}``,
    then a normal close after the final event. Access as for the SSE route: ``Authorization: Bearer``
    or ``?token=``; ``?last_event_id=`` resumes."""
    shim: Shim = websocket.app.state.shim
    scheme, _, value = (websocket.headers.get("authorization") or "").partition(" ")
    creds = HTTPAuthorizationCredentials(scheme=scheme, credentials=value.strip()) if value else None
    try:
        rec = await authorise(shim, job_id, creds, token)
    except ApiError as e:
        await websocket.close(code=status.WS_1008_POLICY_VIOLATION, reason=str(e.detail)[:120])
        return
    try:
        slot = await open_slot(shim, rec.owner)
    except ApiError as e:
        await deny_websocket(websocket, e)
        return
    live = live_state(shim.settings)
    try:
        sub = await live.hub.subscribe(rec.job_id, last_event_id=last_event_id)
    except BaseException:
        await release(slot)
        raise
    try:
        await websocket.accept()
        # the client's side is read too: a client that left (a close, a dropped connection that the
        # server's pings find) ends the stream at once, not at the job's next event
        forward = asyncio.ensure_future(_forward(websocket, live, sub, slot, shim.settings.sse_keepalive_s))
        gone = asyncio.ensure_future(_until_gone(websocket))
        try:
            await asyncio.wait({forward, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (forward, gone):
                task.cancel()
            await asyncio.gather(forward, gone, return_exceptions=True)
        if forward.done() and not forward.cancelled() and forward.exception() is None:
            await websocket.close()
    except WebSocketDisconnect:
        pass
    finally:
        sub.close()
        await release(slot)


async def _forward(
    websocket: WebSocket, live: LiveState, sub: event_log.Subscription, slot: stream_slots.Slot, keepalive_s: float
) -> None:
    async for ev in followed(live, sub, keepalive_s):
        if ev is None:
            await slot.renew()
        else:
            await websocket.send_text(json.dumps({"id": ev.event_id, "data": ev.payload}, ensure_ascii=False))


async def _until_gone(websocket: WebSocket) -> None:
    """Returns when the client has gone (it sends nothing else this stream listens to)."""
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass


async def deny_websocket(websocket: WebSocket, e: ApiError) -> None:
    """Refuse before the handshake: an HTTP answer where the server can send one, else a close."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(problem_response(e.status_code, e.code, str(e.detail), headers=e.headers))
    else:
        await websocket.close(code=status.WS_1013_TRY_AGAIN_LATER, reason=str(e.detail)[:120])
