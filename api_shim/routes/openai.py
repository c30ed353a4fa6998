"""OpenAI-compatible transcription: ``POST /v1/audio/transcriptions``.

A client written for OpenAI's audio API (``client.audio.transcriptions.create(...)`` with
``base_url`` at the shim and an API key of this shim) gets a speaker-attributed transcript.
The request becomes an upload and a job, through the same queue and workers as every other
job, owned by the caller's key; the answer waits up to ``ECG_TRANSCRIBE_WAIT_S`` and carries
the job id in ``X-ECG-Job-Id`` (its result and exports stay under ``/jobs/{id}``).

Every form field is either honoured or refused (400 UNSUPPORTED_OPTION), never ignored:
``model`` is ``whisper-1`` (the server's configured model) or the name of a configured
model; ``prompt`` becomes the job's ``options.prompt`` (Whisper's initial prompt, as OpenAI's
is); ``temperature`` is refused, since the workers fix their own temperature schedule.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from api_shim.deps import CurrentKey, Shim, ShimDep
from api_shim.errors import PROTECTED_RESPONSES, UNAVAILABLE, ApiError, printable, problem_doc
from api_shim.exports import render
from api_shim.routes.uploads import refuse_declared_oversize, save_upload
from api_shim.schemas import JobOptions, ProcessRequest
from api_shim.submission import check_request_async, submit, wait_until_done
from ecg_audio.jobs import JobRecord, JobStatus
from pipeline.errors import DownloadError, InvalidMediaError, ProcessingError, UnsupportedOptionError

OPENAI_PATH = "/v1/audio/transcriptions"
OPENAI_DEFAULT_MODEL = "whisper-1"
FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("segment", "word")
FIELDS = {"file", "model", "language", "prompt", "response_format", "timestamp_granularities[]", "temperature"}
# a job failure the client caused answers 400; the rest are the server's (500)
CLIENT_FAULTS = {InvalidMediaError.code, UnsupportedOptionError.code, DownloadError.code}
# the official clients retry a 5xx; a retry here would start a second job for the same audio
NO_RETRY = {"x-should-retry": "false"}

router = APIRouter(tags=["openai"], responses=PROTECTED_RESPONSES)


def _refuse(detail: str) -> ApiError:
    return ApiError(400, UnsupportedOptionError.code, detail)


@router.post(
    OPENAI_PATH,
    summary="OpenAI-compatible transcription, with speakers (synchronous, within ECG_TRANSCRIBE_WAIT_S)",
    responses={
        200: {
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/plain": {"schema": {"type": "string"}},
                "application/x-subrip": {"schema": {"type": "string"}},
                "text/vtt": {"schema": {"type": "string"}},
            }
        },
        400: problem_doc("An option this server does not honour, or media it cannot read"),
        500: problem_doc("The job failed on the server's side"),
        504: problem_doc("Not done within ECG_TRANSCRIBE_WAIT_S; the job goes on (Location)"),
        **UNAVAILABLE,
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "model"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "model": {"type": "string"},
                            "language": {"type": "string"},
                            "prompt": {"type": "string"},
                            "response_format": {"type": "string", "enum": list(FORMATS)},
                            "timestamp_granularities[]": {
                                "type": "array",
                                "items": {"type": "string", "enum": list(GRANULARITIES)},
                            },
                            "temperature": {"type": "number"},
                        },
                    }
                }
            },
        }
    },
)
async def transcriptions(request: Request, shim: ShimDep, caller: CurrentKey) -> Response:
    refuse_declared_oversize(shim, request)
    await shim.check_rate(caller)  # before the multipart parser spools a byte
    form = await request.form(max_files=1, max_fields=len(FIELDS) + 4)
    try:
        unknown = sorted(set(form.keys()) - FIELDS)
        if unknown:
            raise _refuse(f"unknown form fields {unknown}: this endpoint takes {sorted(FIELDS)}")
        if form.get("temperature") not in (None, ""):
            raise _refuse("temperature is not supported: the workers use their own decoding schedule")
        fmt = str(form.get("response_format") or "json")
        if fmt not in FORMATS:
            raise _refuse(f"response_format {fmt[:40]!r} is not one of {list(FORMATS)}")
        granularities = [str(g) for g in form.getlist("timestamp_granularities[]")]
        if any(g not in GRANULARITIES for g in granularities):
            raise _refuse(f"timestamp_granularities[] takes {list(GRANULARITIES)}")
        if granularities and fmt != "verbose_json":
            raise _refuse("timestamp_granularities[] needs response_format=verbose_json")
        model = _model(shim, str(form.get("model") or ""))
        language = str(form.get("language") or "") or None
        prompt = str(form.get("prompt") or "") or None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise _refuse("file: send the audio as a multipart file part named 'file'")
        # the same checks as every job (language, model), before the audio is stored
        try:
            req = ProcessRequest(
                job_id=f"oai-{uuid.uuid4().hex}",
                video_url="upload://" + "0" * 32,
                language=language,
                options=JobOptions(model=model, prompt=prompt),
            )
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()[:5])
            raise _refuse(printable(problems)[:500]) from None
        await check_request_async(shim, req)
        await shim.admit(caller, req.job_id)  # the key's limits, before the audio is stored
        stored = await save_upload(shim, _chunks(upload))
    finally:
        await form.close()
    req = req.model_copy(update={"video_url": stored.video_url})
    found = (await submit(shim, req, caller, admitted=True))[1]
    rec = await wait_until_done(shim, req.job_id, found)
    return _answer(shim, rec, fmt, granularities)


def _model(shim: Shim, name: str) -> str | None:
    """OpenAI's model name means the server's configured model; a configured model's own name is honoured."""
    if not name:
        raise _refuse("model is required (whisper-1, or a model this server is configured with)")
    if name == OPENAI_DEFAULT_MODEL:
        return None
    served = [m for m in (shim.settings.asr_model, shim.settings.asr_multilingual_model) if m]
    if name not in served:
        raise _refuse(f"model {name[:60]!r} is not served here: use {OPENAI_DEFAULT_MODEL} or one of {served}")
    return name


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(1 << 20):
        yield chunk


def _answer(shim: Shim, rec: JobRecord, fmt: str, granularities: list[str]) -> Response:
    headers = {"X-ECG-Job-Id": rec.job_id}
    if rec.status == JobStatus.FAILED:
        code = rec.error_code or ProcessingError.code
        raise ApiError(400 if code in CLIENT_FAULTS else 500, code, rec.error_message or "the job failed", NO_RETRY)
    env = shim.store.get_result(rec.job_id) if rec.status == JobStatus.COMPLETED else None
    if env is None:
        raise ApiError(
            504,
            "STILL_RUNNING",
            f"not done within {shim.settings.transcribe_wait_s:g} s; the job goes on: GET /jobs/{rec.job_id}",
            {**NO_RETRY, "Location": f"/jobs/{rec.job_id}", **headers},
        )
    result: dict[str, Any] = env["result"]
    segments = result.get("segments", [])
    text = " ".join(s["text"].strip() for s in segments if s.get("text"))
    if fmt == "json":
        return JSONResponse({"text": text}, headers=headers)
    if fmt == "text":
        return PlainTextResponse(text, headers=headers)
    if fmt in ("srt", "vtt"):
        export = render(result, rec.job_id, fmt)  # type: ignore[arg-type]
        return Response(export.text, media_type=export.media_type, headers=headers)
    return JSONResponse(_verbose(result, text, granularities), headers=headers)


def _verbose(result: dict[str, Any], text: str, granularities: list[str]) -> dict[str, Any]:
    """OpenAI's verbose_json, with each segment's (and word's) speaker. Fields the pipeline does not
    measure (tokens, avg_logprob, no_speech_prob …) are left out rather than invented."""
    md = result.get("metadata", {})
    segments = result.get("segments", [])
    body: dict[str, Any] = {"task": "transcribe", "language": md.get("language"), "duration": md.get("duration")}
    body["text"] = text
    if not granularities or "segment" in granularities:
        body["segments"] = [
            {"id": s["id"], "start": s["start"], "end": s["end"], "text": s["text"], **_who(s)} for s in segments
        ]
    if "word" in granularities:
        body["words"] = [
            {"word": w["word"], "start": w["start"], "end": w["end"], **_who(w)}
            for s in segments
            for w in s.get("words", [])
        ]
    return body


def _who(item: dict[str, Any]) -> dict[str, Any]:
    """``speaker``, and where the speaker was recognised its name and similarity (speakers by name)."""
    out = {"speaker": item.get("speaker")}
    if item.get("speaker_name"):
        out |= {"speaker_name": item["speaker_name"], "speaker_similarity": item.get("speaker_similarity")}
    return out
