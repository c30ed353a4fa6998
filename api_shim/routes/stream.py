"""Live transcription: ``WS /v1/stream``, and ``POST /v1/stream/token`` for browsers.

The client sends binary frames of audio (``pcm_s16le``, 16 kHz mono; or ``webm_opus`` /
``ogg_opus``, a browser's MediaRecorder output, decoded here by ``api_shim.live_audio``), then the
text message ``{"type": "stop"}``; it gets ``started`` first (the job id and the signed link to its
job page, which shows the stream live: ``api_shim.routes.view``), then ``partial``, ``final``,
``speaker_update`` messages as a stream worker (``worker.stream``) produces them, then ``end`` with
the job the stream became, or an ``error`` (``code``, ``message``). The shim holds no model: it
claims a slot on a live stream worker (503 + Retry-After before the upgrade when none is free),
relays the audio to it and its messages back through Redis (``ecg_audio.live``), and watches its
heartbeat: a worker that dies is reported as ``STREAM_WORKER_LOST`` within seconds.

At ``stop`` the recording becomes a normal job (``job_id``, or a new ``live-…`` id), owned by the
caller's key: its WAV is stored as an upload and, with ``refine`` (the default), the batch chain
runs on it (``api_shim.submission.submit``); the live finals are kept for its ``result.live``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import struct
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import structlog
from fastapi import APIRouter, WebSocket, WebSocketDisconnect, status
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ValidationError

from api_shim import stream_slots
from api_shim.deps import Caller, CurrentKey, Shim, ShimDep, require_key
from api_shim.errors import PROTECTED_RESPONSES, UNAVAILABLE, ApiError
from api_shim.live_audio import CONTAINERS, PCM, LiveDecoder
from api_shim.routes.events import deny_websocket, release
from api_shim.routes.uploads import save_upload
from api_shim.schemas import JOB_ID_PATTERN, JobOptions, ProcessRequest
from api_shim.submission import check_request_async, submit
from api_shim.view_tokens import make_stream_token, stream_token_owner, view_secret, view_url
from ecg_audio import keys, live
from pipeline.errors import InvalidMediaError, NoStreamSlotError, StreamWorkerLostError, UnsupportedOptionError

log = structlog.get_logger("ecg.shim")

STREAM_PATH = "/v1/stream"
ENCODINGS = (PCM, *CONTAINERS)
SAMPLE_RATES = (16000,)
RETRY_AFTER_S = "5"  # no slot free: a slot frees when a stream ends (seconds to minutes)
OUT_BLOCK_MS = 500  # the relay looks at the worker's heartbeat at least this often
# a stream's hold on its key's live streams (ECG_MAX_LIVE_STREAMS_PER_KEY) is renewed this often and
# lapses this long after a shim that died stopped renewing it
KEY_SLOT_LEASE_S = 30.0

router = APIRouter(tags=["stream"])


class StreamToken(BaseModel):
    token: str
    expires_in: int


@router.post(
    STREAM_PATH + "/token",
    response_model=StreamToken,
    summary="A short-lived token that opens WS /v1/stream as this key (?token=), for browsers",
    responses={**PROTECTED_RESPONSES, **UNAVAILABLE},
)
async def stream_token(shim: ShimDep, caller: CurrentKey) -> StreamToken:
    secret = view_secret(shim.settings)
    if secret is None:  # unreachable with a key accepted (keys derive the secret); kept for clarity
        raise ApiError(503, "NO_TOKEN_SECRET", "stream tokens need ECG_VIEW_SECRET or API keys")
    ttl = shim.settings.stream_token_ttl_s
    return StreamToken(token=make_stream_token(secret, caller.fingerprint, int(time.time()) + ttl), expires_in=ttl)


@dataclass(frozen=True)
class StreamQuery:
    language: str | None
    options: JobOptions
    job_id: str | None
    refine: bool
    encoding: str = PCM


class StreamEnded(Exception):
    """The stream ended on an error the client has been told (or could not be told)."""


@router.websocket(STREAM_PATH)
async def stream(websocket: WebSocket, token: str | None = None) -> None:
    """Live transcription over a WebSocket (the README's ``WS /v1/stream`` has the contract)."""
    shim: Shim = websocket.app.state.shim
    try:
        admitted = await admit(shim, websocket, token, dict(websocket.query_params))
    except ApiError as e:
        await deny_websocket(websocket, e)
        return
    async with holding(admitted):
        try:
            r, caller, query = admitted.r, admitted.caller, admitted.query
            view = await live.open_view(r, admitted.job_id, caller.fingerprint, query.options.locale, KEY_SLOT_LEASE_S)
            await live.start(r, admitted.worker, admitted.start_request())
            await websocket.accept()
            await websocket.send_text(json.dumps(_started(shim, websocket, view)))
            with tempfile.TemporaryDirectory(prefix="ecg-live-") as tmp:
                recording = Path(tmp) / "audio.pcm"
                finals = await _relay(websocket, admitted, recording)
                if finals is not None:
                    await _become_job(shim, websocket, admitted, recording, finals)
        except (WebSocketDisconnect, StreamEnded):
            pass


@dataclass(frozen=True)
class Admitted:
    """A live stream let in: its caller and options, its job id, the stream worker holding a slot
    for it, and its hold on the key's live streams (released by ``holding``)."""

    caller: Caller
    query: StreamQuery
    job_id: str
    r: Any
    worker: str
    held: stream_slots.Slot

    def start_request(self, query: StreamQuery | None = None) -> live.StartRequest:
        q = query or self.query
        return live.StartRequest(self.job_id, q.language, q.options.num_speakers, q.options.max_speakers)


async def admit(shim: Shim, websocket: WebSocket, token: str | None, params: dict[str, str]) -> Admitted:
    """Everything before the upgrade, for every live route: the caller, the stream's options, its
    job id, the key's cap on live streams, a stream worker's slot. An ``ApiError`` refuses it."""
    caller = await _caller(shim, websocket, token)
    query = await stream_query(shim, params)
    job_id = query.job_id or f"live-{uuid.uuid4().hex}"
    if query.job_id and await shim.async_store().get(job_id) is not None:
        raise ApiError(409, "JOB_ID_CONFLICT", f"job_id {job_id!r} is already taken: choose another job_id")
    r = shim.async_store().r
    held = await _key_slot(shim, r, caller)
    try:
        worker = await live.claim_slot(r, job_id)
    except redis.RedisError as e:
        await release(held)
        raise ApiError(503, "QUEUE_UNAVAILABLE", "the job store is unavailable; retry shortly") from e
    if worker is None:
        await release(held)
        raise ApiError(
            503, NoStreamSlotError.code, "no live transcription slot is free", {"Retry-After": RETRY_AFTER_S}
        )
    log.info("live_stream_admitted", job_id=job_id, worker=worker)
    return Admitted(caller, query, job_id, r, worker, held)


@contextlib.asynccontextmanager
async def holding(admitted: Admitted) -> AsyncIterator[None]:
    """The stream's hold on its key's live streams renewed while it lasts; at the end, whatever
    happened, the worker told to drop the stream (if still at it), the slot and the hold given back."""
    renewing = asyncio.ensure_future(_keep(admitted.held, admitted.r, admitted.job_id))
    try:
        yield
    finally:
        renewing.cancel()
        await live.abandon(admitted.r, admitted.worker, admitted.job_id)
        await release(admitted.held)


async def _key_slot(shim: Shim, r: Any, caller: Caller) -> stream_slots.Slot:
    """This stream's place among its key's live streams (``ECG_MAX_LIVE_STREAMS_PER_KEY``), or 429:
    one tenant cannot take every stream worker's slots."""
    cap = shim.settings.max_live_streams_per_key
    try:
        slot = await stream_slots.acquire(r, caller.fingerprint, cap, KEY_SLOT_LEASE_S, prefix=keys.LIVE_PER_KEY)
    except redis.RedisError as e:
        raise ApiError(503, "QUEUE_UNAVAILABLE", "the job store is unavailable; retry shortly") from e
    if slot is None:
        raise ApiError(
            429,
            "TOO_MANY_STREAMS",
            f"this API key already has {cap} live streams open; stop one first",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    return slot


async def _keep(slot: stream_slots.Slot, r: Any, stream_id: str) -> None:
    """Renew the key's hold and the stream's page while the stream lasts (a Redis blip skips one renewal)."""
    while True:
        await asyncio.sleep(KEY_SLOT_LEASE_S / 3)
        with contextlib.suppress(redis.RedisError):
            await slot.renew()
            await live.renew_view(r, stream_id, KEY_SLOT_LEASE_S)


def _started(shim: Shim, websocket: WebSocket, view: live.LiveView) -> dict[str, Any]:
    """The stream's first message: its job id (known now) and the signed link to its job page, which
    shows the stream live, then the job it becomes (the link stays good for that job)."""
    base = str(websocket.base_url).replace("ws", "http", 1)  # ws:// -> http://, wss:// -> https://
    url = view_url(shim.settings, view.stream_id, base, first_run=view.first_run)
    return {"type": "started", "job_id": view.stream_id, "view_url": url}


async def _caller(shim: Shim, websocket: WebSocket, token: str | None) -> Caller:
    """The key this stream acts for: ``Authorization: Bearer`` or a stream token."""
    if token is not None:
        owner = stream_token_owner(view_secret(shim.settings), token)
        if owner is None:
            raise ApiError(403, "FORBIDDEN", "stream token not accepted (expired, or not made here)")
        return Caller(fingerprint=owner)
    scheme, _, value = (websocket.headers.get("authorization") or "").partition(" ")
    creds = HTTPAuthorizationCredentials(scheme=scheme, credentials=value.strip()) if value else None
    return await require_key(shim, creds)


async def stream_query(shim: Shim, params: dict[str, str]) -> StreamQuery:
    """The stream's options, checked as a job's are (422 for what no worker could serve)."""
    known = {"language", "encoding", "sample_rate", "num_speakers", "max_speakers", "job_id", "locale", "refine"}
    unknown = sorted(set(params) - known - {"token"})
    if unknown:
        raise ApiError(422, UnsupportedOptionError.code, f"unknown query parameters {unknown}")
    if params.get("encoding", ENCODINGS[0]) not in ENCODINGS:
        raise ApiError(422, UnsupportedOptionError.code, f"encoding: one of {list(ENCODINGS)}")
    encoding = params.get("encoding", PCM)
    if encoding != PCM and "sample_rate" in params:
        raise ApiError(422, UnsupportedOptionError.code, f"sample_rate: only for {PCM} ({encoding} carries its own)")
    if params.get("sample_rate", str(SAMPLE_RATES[0])) not in {str(r) for r in SAMPLE_RATES}:
        raise ApiError(422, UnsupportedOptionError.code, f"sample_rate: one of {list(SAMPLE_RATES)}")
    job_id = params.get("job_id") or None
    if job_id is not None and not re.fullmatch(JOB_ID_PATTERN, job_id):
        raise ApiError(422, UnsupportedOptionError.code, "job_id: letters, digits, '.', '_', '-' (at most 128)")
    refine = params.get("refine", "true").lower()
    if refine not in ("true", "false", "1", "0"):
        raise ApiError(422, UnsupportedOptionError.code, "refine: true or false")
    if refine in ("false", "0"):
        raise ApiError(422, UnsupportedOptionError.code, "refine=false is not served yet: the stream's job is refined")
    try:
        options = JobOptions(
            num_speakers=params.get("num_speakers") or None,  # type: ignore[arg-type]
            max_speakers=params.get("max_speakers") or None,  # type: ignore[arg-type]
            locale=params.get("locale") or None,  # type: ignore[arg-type]
        )
        language = params.get("language") or None
        probe = ProcessRequest(job_id="probe", video_url="upload://" + "0" * 32, language=language, options=options)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()[:5])
        raise ApiError(422, UnsupportedOptionError.code, problems[:500]) from None
    await check_request_async(shim, probe)  # the one language rule (ecg_audio.languages)
    return StreamQuery(probe.language, options, job_id, True, encoding)


async def _relay(websocket: WebSocket, admitted: Admitted, recording: Path) -> dict[str, Any] | None:
    """Audio in and messages out until the worker is done: its live result; None when the client left."""
    r, stream_id, encoding = admitted.r, admitted.job_id, admitted.query.encoding
    audio_in = _audio_in if encoding == PCM else _compressed_audio_in
    inbound = asyncio.ensure_future(audio_in(websocket, r, stream_id, recording, encoding))
    outbound = asyncio.ensure_future(_messages_out(websocket, r, admitted.worker, stream_id))
    try:
        done, _ = await asyncio.wait({inbound, outbound}, return_when=asyncio.FIRST_COMPLETED)
        if inbound in done and inbound.result() is False:  # the client went away before stop
            return None
        return await outbound
    finally:
        for task in (inbound, outbound):
            task.cancel()
        await asyncio.gather(inbound, outbound, return_exceptions=True)


class _ClientLeft(Exception):
    """The client went away before its ``stop``."""


async def _frames(websocket: WebSocket) -> AsyncIterator[bytes]:
    """The client's binary frames until its ``stop``; ``_ClientLeft`` when it goes away first. Text
    that is not ``{"type": "stop"}`` is ignored."""
    while True:
        msg = await websocket.receive()
        if msg["type"] == "websocket.disconnect":
            raise _ClientLeft
        data = msg.get("bytes")
        if data:
            yield data
            continue
        with contextlib.suppress(ValueError):
            message = json.loads(msg.get("text") or "")
            if isinstance(message, dict) and message.get("type") == "stop":
                return


async def _audio_in(websocket: WebSocket, r: Any, stream_id: str, recording: Path, _encoding: str = PCM) -> bool:
    """Binary frames to the worker (and the recording) until ``stop``: True; False when the client left."""
    with open(recording, "wb") as spool:
        try:
            async for data in _frames(websocket):
                spool.write(data)
                await live.push_audio(r, stream_id, data)
        except _ClientLeft:
            return False
        await live.push_stop(r, stream_id)
        return True


async def _compressed_audio_in(websocket: WebSocket, r: Any, stream_id: str, recording: Path, encoding: str) -> bool:
    """``_audio_in`` for WebM/Ogg Opus: the frames go through ffmpeg; its pcm goes to the worker and
    the recording as it comes. Data ffmpeg cannot decode ends the stream with ``INVALID_MEDIA``."""
    decoder = LiveDecoder(encoding)
    await decoder.start()
    with open(recording, "wb") as spool:

        async def pump() -> None:
            async for pcm in decoder.pcm():
                spool.write(pcm)
                await live.push_audio(r, stream_id, pcm)

        pumping = asyncio.ensure_future(pump())
        try:
            try:
                async for data in _frames(websocket):
                    if pumping.done() or not await decoder.feed(data):
                        break  # ffmpeg gave up on the data before stop
            except _ClientLeft:
                return False
            await decoder.finish()
            await pumping
            problem = await decoder.failure()
            if problem is not None:
                err = InvalidMediaError(f"the stream's audio is not {encoding}: {problem}")
                await websocket.send_text(json.dumps({"type": "error", "code": err.code, "message": err.message}))
                await websocket.close(code=status.WS_1003_UNSUPPORTED_DATA)
                raise StreamEnded(err.code)
            await live.push_stop(r, stream_id)
            return True
        finally:
            pumping.cancel()
            await asyncio.gather(pumping, return_exceptions=True)
            await decoder.close()


async def worker_messages(r: Any, worker: str, stream_id: str) -> AsyncIterator[dict[str, Any]]:
    """The worker's messages of a stream, as they come, up to and with its ``done`` (which carries
    the live result). A lapsed heartbeat raises ``StreamWorkerLostError``."""
    last = "0-0"
    while True:
        reply = await r.xread({live.out_key(stream_id): last}, block=OUT_BLOCK_MS, count=100)
        for _key, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id
                message: dict[str, Any] = json.loads(fields["m"])
                yield message
                if message["type"] == live.DONE:
                    return
        if not reply and not await live.worker_alive(r, worker):
            log.warning("live_stream_worker_lost", stream_id=stream_id, worker=worker)
            raise StreamWorkerLostError("the live transcription worker stopped; reconnect to start a new stream")


async def _messages_out(websocket: WebSocket, r: Any, worker: str, stream_id: str) -> dict[str, Any]:
    """The worker's messages to the client until ``done`` (returns its live result); a lapsed
    heartbeat or an error from the worker ends the stream (``StreamEnded``) after telling the client."""
    try:
        async for message in worker_messages(r, worker, stream_id):
            if message["type"] == live.DONE:
                return dict(message.get("live") or {})
            await websocket.send_text(json.dumps(message, ensure_ascii=False))
            if message["type"] == "error":
                await websocket.close(code=status.WS_1011_INTERNAL_ERROR)
                raise StreamEnded(message.get("code"))
    except StreamWorkerLostError as err:
        await websocket.send_text(json.dumps({"type": "error", "code": err.code, "message": err.message}))
        await websocket.close(code=status.WS_1013_TRY_AGAIN_LATER)
        raise StreamEnded(err.code) from None
    raise StreamEnded("no done")  # unreachable: worker_messages ends with done or raises


async def _become_job(
    shim: Shim, websocket: WebSocket, admitted: Admitted, recording: Path, finals: dict[str, Any]
) -> None:
    """The recording made a job (``recording_job``); ``end`` sent, or the ``error`` that prevented it."""
    try:
        job_id = await recording_job(shim, admitted, recording, finals)
    except ApiError as e:  # the job could not be made (a limit, Redis away): the client hears why
        await websocket.send_text(json.dumps({"type": "error", "code": e.code, "message": str(e.detail)}))
        await websocket.close(code=status.WS_1011_INTERNAL_ERROR)
        return
    await websocket.send_text(json.dumps({"type": "end", "job_id": job_id}))
    await websocket.close()


async def recording_job(
    shim: Shim, admitted: Admitted, recording: Path, finals: dict[str, Any], query: StreamQuery | None = None
) -> str | None:
    """A stream's recording (raw 16 kHz pcm_s16le) stored as an upload, its live finals kept, its
    job submitted for the caller: the job id; None when nothing was recorded. ``ApiError`` when the
    job could not be made."""
    if recording.stat().st_size < 2:
        return None
    q = query or admitted.query
    stored = await save_upload(shim, _as_wav(recording))
    await live.store_live_result(shim.async_store().r, admitted.job_id, finals, shim.settings.job_ttl_s)
    req = ProcessRequest(job_id=admitted.job_id, video_url=stored.video_url, language=q.language, options=q.options)
    await submit(shim, req, admitted.caller, admitted=False)
    log.info("live_stream_job", job_id=admitted.job_id, bytes=stored.bytes)
    return admitted.job_id


def wav_header(data_bytes: int, sample_rate: int = SAMPLE_RATES[0]) -> bytes:
    """The 44-byte header of a 16-bit mono PCM WAV file holding ``data_bytes`` of samples."""
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", data_bytes)
    )


async def _as_wav(recording: Path) -> AsyncIterator[bytes]:
    """The raw pcm_s16le recording with a WAV header in front (16 kHz mono)."""
    size = recording.stat().st_size // 2 * 2
    yield wav_header(size)
    with open(recording, "rb") as fh:
        left = size
        while left > 0 and (chunk := fh.read(min(1 << 20, left))):
            left -= len(chunk)
            yield chunk
