"""OpenAI Realtime transcription sessions: ``WS /v1/realtime``, on the machinery of ``WS /v1/stream``.

A tool written for OpenAI's realtime transcription (the official client's
``client.realtime.connect(extra_query={"intent": "transcription"})``, or the beta
``client.beta.realtime.connect`` with ``transcription_session.update``) works with ``base_url`` at
the shim and one of its API keys. The session is a live stream like any other (``api_shim.routes.stream``:
``admit`` before the upgrade, a stream worker's slot, ``holding``, ``worker_messages``, the recording
becoming a refined job through ``recording_job``); only the events differ:

* in: ``session.update`` / ``transcription_session.update`` (audio format pcm16 at 24 kHz, resampled
  here to the workers' 16 kHz; transcription ``model`` and ``language``; turn detection accepted,
  the effective policy reported), ``input_audio_buffer.append`` (base64 audio),
  ``input_audio_buffer.commit`` (the end of a turn: what was heard is made final now, and the
  session goes on), ``input_audio_buffer.clear`` (before any audio); the client closing the socket
  ends the audio: the rest is transcribed and the recording becomes its job;
* out: ``session.created`` / ``transcription_session.created``, ``…updated``,
  ``input_audio_buffer.committed`` (one per item, when our own policy opens it),
  ``conversation.item.input_audio_transcription.delta`` (the growth of the worker's partial),
  ``…segment`` (the item's speaker, again when a merge relabels it) and ``…completed``
  (one per final), ``error`` with our codes (``pipeline.errors``) in OpenAI's shape.

Anything else (a prompt, noise reduction, logprobs, G.711, conversation events) is answered
with an ``error`` event naming it, never ignored.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import soxr
import structlog
from fastapi import APIRouter, WebSocket, WebSocketDisconnect, status

from api_shim.deps import Shim
from api_shim.errors import ApiError
from api_shim.routes.events import deny_websocket
from api_shim.routes.openai import OPENAI_DEFAULT_MODEL
from api_shim.routes.stream import (
    Admitted,
    StreamEnded,
    StreamQuery,
    admit,
    holding,
    recording_job,
    stream_query,
    worker_messages,
)
from ecg_audio import live
from pipeline.errors import (
    InvalidMediaError,
    ProcessingError,
    StageTimeoutError,
    StreamWorkerLostError,
    UnsupportedOptionError,
)
from pipeline.streaming.session import LiveOptions

log = structlog.get_logger("ecg.shim")

REALTIME_PATH = "/v1/realtime"
OPENAI_RATE = 24000  # OpenAI's pcm16: 24 kHz mono little-endian
WORKER_RATE = 16000
# OpenAI's transcription models (the client's AudioTranscription.model): each means the stream
# workers' live models, as whisper-1 means the server's model on /v1/audio/transcriptions
MODELS = (
    OPENAI_DEFAULT_MODEL,
    "gpt-transcribe",
    "gpt-live-transcribe",
    "gpt-4o-transcribe",
    "gpt-4o-mini-transcribe",
    "gpt-4o-mini-transcribe-2025-12-15",
    "gpt-4o-transcribe-diarize",
    "gpt-realtime-whisper",
)
# what the stream worker closes an utterance on, reported as the session's turn detection
TURN_DETECTION = {"type": "server_vad", "silence_duration_ms": round(LiveOptions().pause_close_s * 1000)}
# fields a transcription session names that live streams do not serve: refused unless empty
NOT_SERVED = {
    "prompt": "a prompt is not taken by live streams",
    "noise_reduction": "noise reduction is not served: send null",
    "include": "logprobs are not served",
    "keywords": "keywords are not served by live streams",
    "languages": "send one language, or none to have it identified",
    "delay": "the delay is the stream workers' own",
}
# stream options a realtime URL may carry beside OpenAI's (the audio format is the session's)
STREAM_PARAMS = ("language", "num_speakers", "max_speakers", "job_id", "locale", "token")
CLIENT_FAULT, SERVER_FAULT = "invalid_request_error", "server_error"
VALIDATION_ERROR = "VALIDATION_ERROR"
UNSET = object()

router = APIRouter(tags=["stream"])


class EventError(Exception):
    """A client event refused: an ``error`` event, the session goes on."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def _refuse(message: str, param: str | None = None) -> EventError:
    return EventError(UnsupportedOptionError.code, message, param)


@router.websocket(REALTIME_PATH)
async def realtime(websocket: WebSocket) -> None:
    """OpenAI's realtime transcription protocol over a live stream (the README's ``WS /v1/realtime``)."""
    shim: Shim = websocket.app.state.shim
    params = dict(websocket.query_params)
    try:
        stream_params = _stream_params(params)
        admitted = await admit(shim, websocket, stream_params.pop("token", None), stream_params)
    except ApiError as e:
        await deny_websocket(websocket, e)
        return
    beta = "realtime=v1" in (websocket.headers.get("openai-beta") or "")
    async with holding(admitted):
        await websocket.accept()
        with tempfile.TemporaryDirectory(prefix="ecg-realtime-") as tmp, open(Path(tmp) / "audio.pcm", "wb") as spool:
            model = params.get("model")
            session = RealtimeSession(shim, websocket, admitted, stream_params, spool, beta=beta, model=model)
            with contextlib.suppress(StreamEnded, WebSocketDisconnect):
                await session.run()


def _stream_params(params: dict[str, str]) -> dict[str, str]:
    """The live stream's options from a realtime URL: OpenAI's ``intent`` and ``model`` checked
    (a conversation session is not served), the rest as ``WS /v1/stream`` takes them."""
    if params.get("intent", "transcription") != "transcription":
        raise ApiError(422, UnsupportedOptionError.code, "intent: only transcription sessions are served here")
    if params.get("model") and params["model"] not in MODELS:
        raise ApiError(
            422,
            UnsupportedOptionError.code,
            f"model {params['model'][:60]!r}: conversation sessions are not served; connect with "
            f"intent=transcription (transcription models: {list(MODELS)})",
        )
    unknown = sorted(set(params) - {"intent", "model", *STREAM_PARAMS})
    if unknown:
        raise ApiError(
            422,
            UnsupportedOptionError.code,
            f"unknown query parameters {unknown}: the audio format is set with session.update",
        )
    return {k: v for k, v in params.items() if k in STREAM_PARAMS}


@dataclass(frozen=True)
class Update:
    """What one ``session.update`` asks for, each value with the path that named it (``UNSET``: not named)."""

    fields: dict[str, tuple[str, Any]]

    def get(self, name: str) -> tuple[str, Any]:
        return self.fields.get(name, ("", UNSET))


def _ga_update(session: dict[str, Any]) -> Update:
    """A GA ``session.update``'s transcription session, as the fields we look at."""
    if session.get("type") != "transcription":
        raise _refuse(
            f"session.type {session.get('type')!r}: only transcription sessions are served here", "session.type"
        )
    _only(session, {"type", "id", "object", "audio", "include"}, "session")
    audio = _object(session.get("audio"), "session.audio")
    _only(audio, {"input"}, "session.audio")
    given = _object(audio.get("input"), "session.audio.input")
    _only(given, {"format", "transcription", "turn_detection", "noise_reduction"}, "session.audio.input")
    fields: dict[str, tuple[str, Any]] = {}
    path = "session.audio.input"
    for name in ("format", "turn_detection", "noise_reduction"):
        if name in given:
            fields[name] = (f"{path}.{name}", given[name])
    if "include" in session:
        fields["include"] = ("session.include", session["include"])
    if "transcription" in given:
        tr = _object(given["transcription"], f"{path}.transcription")
        for name in tr:
            fields[name] = (f"{path}.transcription.{name}", tr[name])
    if "format" in fields:
        fmt = fields["format"][1]
        pcm = isinstance(fmt, dict) and fmt.get("type") == "audio/pcm" and fmt.get("rate", OPENAI_RATE) == OPENAI_RATE
        fields["format"] = (fields["format"][0], "pcm16" if pcm else fmt)
    return Update(fields)


def _beta_update(session: dict[str, Any]) -> Update:
    """A beta ``transcription_session.update``'s session, as the fields we look at."""
    names = {
        "input_audio_format": "format",
        "input_audio_noise_reduction": "noise_reduction",
        "turn_detection": "turn_detection",
        "include": "include",
    }
    _only(session, {*names, "input_audio_transcription", "modalities", "id", "object"}, "session")
    fields = {names[k]: (f"session.{k}", v) for k, v in session.items() if k in names}
    if "input_audio_transcription" in session:
        tr = _object(session["input_audio_transcription"], "session.input_audio_transcription")
        fields |= {name: (f"session.input_audio_transcription.{name}", v) for name, v in tr.items()}
    if session.get("modalities") not in (None, ["text"]):
        raise _refuse("modalities: a transcription session answers in text only", "session.modalities")
    return Update(fields)


def _object(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EventError(VALIDATION_ERROR, f"{path}: an object", path)
    return value


def _only(given: dict[str, Any], known: set[str], path: str) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise _refuse(f"{path}: {unknown} not served in a transcription session here", f"{path}.{unknown[0]}")


class RealtimeSession:
    """One realtime connection: client events in, the worker's messages out as OpenAI's events.

    The worker gets the stream at the first audio (a ``session.update`` before it may set the
    language). Each of our finals is one conversation item: ``committed`` when it opens (before
    its first delta), ``delta`` while the worker's partial grows, ``segment`` and ``completed`` at
    the final. A partial that revises what the deltas said sends nothing more for that item: the
    completed transcript is the one that counts.
    """

    def __init__(
        self,
        shim: Shim,
        websocket: WebSocket,
        admitted: Admitted,
        params: dict[str, str],
        spool: BinaryIO,
        *,
        beta: bool,
        model: str | None,
    ) -> None:
        self.shim, self.ws, self.admitted = shim, websocket, admitted
        self.params = params  # the URL's stream options: a session.update's language is checked with them
        self.spool = spool  # the recording, 16 kHz pcm_s16le, as the worker gets it
        self.beta = beta  # the beta dialect (transcription_session.*)
        self.query: StreamQuery = admitted.query
        self.model = model or OPENAI_DEFAULT_MODEL
        self.started = self.ended = self.gone = False
        self.uncommitted = False  # audio appended since the last commit
        self.completed_since_commit = 0
        self.resampler = soxr.ResampleStream(OPENAI_RATE, WORKER_RATE, 1, dtype="int16")
        self.odd = b""  # a byte of a sample split between two appends
        self.sending = asyncio.Lock()
        self.item: str | None = None  # the open item: deltas go to it, the next final completes it
        self.shown = ""  # what the deltas of the open item have said
        self.previous: str | None = None
        self.segments: dict[int, dict[str, Any]] = {}  # final id -> its segment event

    async def run(self) -> None:
        await self._emit("transcription_session.created" if self.beta else "session.created", session=self._session())
        inbound = asyncio.ensure_future(self._events_in())
        outbound = asyncio.ensure_future(self._events_out())
        try:
            done, _ = await asyncio.wait({inbound, outbound}, return_when=asyncio.FIRST_COMPLETED)
            if outbound not in done:  # the client left (or fell silent) before the worker was done
                inbound.result()  # an inbound failure (Redis away) ends the session as it is
                self.gone = True
                if not self.started:
                    return
                if not self.ended:  # what it sent is transcribed all the same, and becomes its job
                    await self._end_audio()
            finals = await outbound
            await self._become_job(finals)
        finally:
            for task in (inbound, outbound):
                task.cancel()
            await asyncio.gather(inbound, outbound, return_exceptions=True)

    # --- client events ----------------------------------------------------------------------

    async def _events_in(self) -> None:
        """Client events until the client leaves, or sends nothing for ``ECG_STREAM_IDLE_S``."""
        idle_s = self.shim.settings.stream_idle_s
        while True:
            try:
                msg = await asyncio.wait_for(self.ws.receive(), idle_s)
            except TimeoutError:
                await self._error(CLIENT_FAULT, StageTimeoutError.code, f"no event in {idle_s:g} s: the end")
                await self._close(status.WS_1008_POLICY_VIOLATION)
                return
            if msg["type"] == "websocket.disconnect":
                return
            event_id = None
            try:
                event = self._parse(msg)
                event_id = event.get("event_id")
                await self._handle(event)
            except EventError as e:
                await self._error(CLIENT_FAULT, e.code, e.message, param=e.param, event_id=event_id)
            except ApiError as e:  # a language refused by the one language rule
                await self._error(CLIENT_FAULT, e.code, str(e.detail), event_id=event_id)

    @staticmethod
    def _parse(msg: Mapping[str, Any]) -> dict[str, Any]:
        if msg.get("text") is None:
            raise EventError(VALIDATION_ERROR, "binary frames are not events: send input_audio_buffer.append")
        try:
            event = json.loads(msg["text"])
        except ValueError:
            raise EventError(VALIDATION_ERROR, "an event is a JSON object") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise EventError(VALIDATION_ERROR, "an event is a JSON object with a type", "type")
        return event

    async def _handle(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "input_audio_buffer.append":
            await self._append(event.get("audio"))
        elif kind in ("session.update", "transcription_session.update"):
            session = _object(event.get("session"), "session")
            await self._update(_ga_update(session) if kind == "session.update" else _beta_update(session))
            updated = "transcription_session.updated" if self.beta else "session.updated"
            await self._emit(updated, session=self._session())
        elif kind == "input_audio_buffer.commit":
            if not self.uncommitted:
                raise EventError(VALIDATION_ERROR, "the input audio buffer is empty: append audio first")
            await self._commit()
        elif kind == "input_audio_buffer.clear":
            if self.started:
                raise _refuse("audio already appended is transcribed as it arrives: it cannot be cleared")
            await self._emit("input_audio_buffer.cleared")
        else:
            raise _refuse(
                f"{kind[:60]!r} is not served: a transcription session takes session.update, "
                "input_audio_buffer.append, input_audio_buffer.commit and input_audio_buffer.clear",
                "type",
            )

    async def _update(self, update: Update) -> None:
        """Every field checked before any is applied: a refused update changes nothing."""
        path, fmt = update.get("format")
        if fmt is not UNSET and fmt not in (None, "pcm16"):
            raise _refuse(f"audio format {fmt!r}: pcm16 (audio/pcm, 24000 Hz) only", path)
        path, model = update.get("model")
        if model not in (UNSET, None) and model not in MODELS:
            raise _refuse(f"model {str(model)[:60]!r} is not served here: one of {list(MODELS)}", path)
        for name, why in NOT_SERVED.items():
            path, value = update.get(name)
            if value not in (UNSET, None, "", []):
                raise _refuse(f"{path}: {why}", path)
        path, turns = update.get("turn_detection")
        if turns not in (UNSET, None) and (
            not isinstance(turns, dict) or turns.get("type") not in ("server_vad", "semantic_vad")
        ):
            raise _refuse("turn_detection: server_vad, semantic_vad or null (the server commits on its own)", path)
        unknown = sorted(set(update.fields) - {"format", "model", "language", "turn_detection", *NOT_SERVED})
        if unknown:
            path = update.fields[unknown[0]][0]
            raise _refuse(f"{path}: not served in a transcription session here", path)
        query = self.query
        path, language = update.get("language")
        if language is not UNSET:
            query = await stream_query(self.shim, self.params | {"language": language or ""})
            if self.started and query.language != self.query.language:
                raise _refuse("the language is fixed once audio has come: open a new session", path)
        self.query = query
        if model not in (UNSET, None):
            self.model = str(model)

    async def _append(self, audio: Any) -> None:
        if not isinstance(audio, str):
            raise EventError(VALIDATION_ERROR, "audio: base64 of pcm16 (24 kHz mono little-endian)", "audio")
        try:
            data = self.odd + base64.b64decode(audio, validate=True)
        except binascii.Error:
            raise EventError(InvalidMediaError.code, "audio: not base64", "audio") from None
        if not self.started:
            await live.start(self.admitted.r, self.admitted.worker, self.admitted.start_request(self.query))
            self.started = True
        whole = len(data) // 2 * 2
        self.odd = data[whole:]
        self.uncommitted = self.uncommitted or whole > 0
        samples = np.frombuffer(data[:whole], dtype="<i2")
        await self._forward(self.resampler.resample_chunk(samples))

    async def _forward(self, samples: np.ndarray) -> None:
        pcm = samples.astype("<i2").tobytes()
        if pcm:
            self.spool.write(pcm)
            await live.push_audio(self.admitted.r, self.admitted.job_id, pcm)

    async def _commit(self) -> None:
        """The end of the client's turn: the worker makes what it heard final now (``flush``) and
        answers ``flushed`` once those finals are out; the session goes on. (The resampler keeps its
        last few samples for the next append's continuity.)"""
        self.uncommitted = False
        self.completed_since_commit = 0
        await live.push_flush(self.admitted.r, self.admitted.job_id)

    async def _end_audio(self) -> None:
        """The rest of the resampler's audio, then ``stop``: the worker finishes every final."""
        self.ended = True
        await self._forward(self.resampler.resample_chunk(np.zeros(0, dtype=np.int16), last=True))
        self.spool.flush()
        await live.push_stop(self.admitted.r, self.admitted.job_id)

    # --- the worker's messages --------------------------------------------------------------

    async def _events_out(self) -> dict[str, Any]:
        """The worker's messages as OpenAI's events until ``done``: its live result."""
        try:
            async for message in worker_messages(self.admitted.r, self.admitted.worker, self.admitted.job_id):
                kind = message["type"]
                if kind == live.DONE:
                    return dict(message.get("live") or {})
                if kind == "partial":
                    await self._delta(message["text"])
                elif kind == "final":
                    await self._completed(message)
                elif kind == live.FLUSHED and not self.completed_since_commit:
                    # a commit of audio with no words in it still gets its item, as OpenAI answers one
                    await self._completed({"id": None, "start": 0.0, "end": 0.0, "text": ""})
                elif kind == "speaker_update" and message["id"] in self.segments:
                    segment = self.segments[message["id"]] | {"speaker": message["speaker"]}
                    self.segments[message["id"]] = segment
                    await self._emit(segment["type"], **{k: v for k, v in segment.items() if k != "type"})
                elif kind == "error":
                    await self._error(SERVER_FAULT, message.get("code") or ProcessingError.code, message.get("message"))
                    await self._close(status.WS_1011_INTERNAL_ERROR)
                    raise StreamEnded(message.get("code"))
        except StreamWorkerLostError as e:
            await self._error(SERVER_FAULT, e.code, e.message)
            await self._close(status.WS_1013_TRY_AGAIN_LATER)
            raise StreamEnded(e.code) from None
        raise StreamEnded("no done")  # unreachable: worker_messages ends with done or raises

    async def _open_item(self) -> str:
        if self.item is None:
            self.item, self.shown = f"item_{uuid.uuid4().hex[:20]}", ""
            await self._emit("input_audio_buffer.committed", item_id=self.item, previous_item_id=self.previous)
        return self.item

    async def _delta(self, text: str) -> None:
        item = await self._open_item()
        if len(text) > len(self.shown) and text.startswith(self.shown):
            delta, self.shown = text[len(self.shown) :], text
            kind = "conversation.item.input_audio_transcription.delta"
            await self._emit(kind, item_id=item, content_index=0, delta=delta)

    async def _completed(self, final: dict[str, Any]) -> None:
        item = await self._open_item()
        start, end, text, speaker = final["start"], final["end"], final["text"], final.get("speaker")
        if speaker:
            segment = {
                "type": "conversation.item.input_audio_transcription.segment",
                "id": f"seg_{final['id']}",
                "item_id": item,
                "content_index": 0,
                "start": start,
                "end": end,
                "text": text,
                "speaker": speaker,
            }
            self.segments[final["id"]] = segment
            await self._emit(segment["type"], **{k: v for k, v in segment.items() if k != "type"})
        await self._emit(
            "conversation.item.input_audio_transcription.completed",
            item_id=item,
            content_index=0,
            transcript=text,
            usage={"type": "duration", "seconds": round(end - start, 3)},
            # ours, beside OpenAI's fields: who spoke, when, in what language
            speaker=speaker,
            start=start,
            end=end,
            language=final.get("language"),
        )
        self.previous, self.item = item, None
        self.completed_since_commit += 1

    async def _become_job(self, finals: dict[str, Any]) -> None:
        """The recording as a job (``recording_job``), as at a stream's ``stop``; the socket closed."""
        self.spool.flush()
        try:
            job_id = await recording_job(self.shim, self.admitted, Path(self.spool.name), finals, self.query)
        except ApiError as e:
            await self._error(SERVER_FAULT, e.code, str(e.detail))
            await self._close(status.WS_1011_INTERNAL_ERROR)
            return
        log.info("realtime_session_ended", job_id=job_id, client_ended=self.ended)
        # not ended by the client: the worker ended the stream (ECG_STREAM_MAX_S, or ECG_STREAM_IDLE_S without audio)
        reason = "" if self.ended else "the stream ended: it reached its longest, or had no audio for too long"
        await self._close(status.WS_1000_NORMAL_CLOSURE, reason)

    # --- sending ----------------------------------------------------------------------------

    def _session(self) -> dict[str, Any]:
        """The session as it is served (the effective configuration), in the client's dialect;
        its ``id`` is the job the recording becomes."""
        transcription = {"model": self.model, "language": self.query.language, "prompt": ""}
        if self.beta:
            return {
                "id": self.admitted.job_id,
                "object": "realtime.transcription_session",
                "input_audio_format": "pcm16",
                "input_audio_transcription": transcription,
                "turn_detection": TURN_DETECTION,
                "input_audio_noise_reduction": None,
                "include": None,
                "modalities": ["text"],
            }
        return {
            "type": "transcription",
            "id": self.admitted.job_id,
            "object": "realtime.transcription_session",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": OPENAI_RATE},
                    "transcription": transcription,
                    "turn_detection": TURN_DETECTION,
                    "noise_reduction": None,
                }
            },
            "include": None,
        }

    async def _error(
        self, kind: str, code: str, message: str | None, *, param: str | None = None, event_id: Any = None
    ) -> None:
        error = {"type": kind, "code": code, "message": message or code, "param": param, "event_id": event_id}
        await self._emit("error", error=error)

    async def _emit(self, kind: str, **fields: Any) -> None:
        """One server event; nothing once the client has gone."""
        if self.gone:
            return
        event = {"type": kind, "event_id": f"event_{uuid.uuid4().hex[:20]}", **fields}
        try:
            async with self.sending:
                await self.ws.send_text(json.dumps(event, ensure_ascii=False))
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.gone = True

    async def _close(self, code: int, reason: str = "") -> None:
        if not self.gone:
            self.gone = True
            with contextlib.suppress(RuntimeError, OSError):
                await self.ws.close(code=code, reason=reason or None)
