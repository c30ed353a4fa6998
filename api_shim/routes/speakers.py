"""Speakers: the API key's library of enrolled voices, so that jobs name their speakers.

``POST /speakers`` enrolls a voice from a sample (multipart ``name`` + ``file``: 5-60 s of
that one voice) or from a finished job of the same key (JSON ``{name, from_job, speaker}``).
A sample file needs the diarization's model, which the shim never loads: it is stored as an
upload and embedded by a worker (task ``ecg.speakers.enroll`` on the model queue), which
deletes it once embedded; this route waits for that, up to ``ECG_SPEAKER_ENROLL_WAIT_S``.

``DELETE /speakers/{id}`` erases the voiceprint for good. Another key's speakers answer 404.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api_shim.deps import Caller, CurrentKey, Shim, ShimDep
from api_shim.errors import NOT_FOUND, PROTECTED_RESPONSES, UNAVAILABLE, ApiError
from api_shim.middleware import MAX_JSON_BODY_BYTES
from api_shim.routes.uploads import save_upload
from api_shim.submission import existing_job
from ecg_audio.jobs import JobStatus
from ecg_audio.speakers import ENROLL_EXPIRES_S, ENROLL_TASK, SPEAKER_ID_PATTERN, SpeakerLibrary, SpeakerRecord
from ecg_audio.uploads import s3_key, upload_id, uploads_dir
from pipeline.errors import InvalidMediaError

log = structlog.get_logger("ecg.shim")
router = APIRouter(tags=["speakers"], responses=PROTECTED_RESPONSES)

SPEAKERS_PATH = "/speakers"
SpeakerName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")
]
SpeakerId = Annotated[str, Field(pattern=SPEAKER_ID_PATTERN)]
SAMPLE_CODES = {"SAMPLE_DURATION", "SAMPLE_NO_SPEECH", "SAMPLE_MULTIPLE_VOICES", InvalidMediaError.code}


class FromJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: SpeakerName | None = None
    from_job: str | None = Field(None, min_length=1, max_length=128, description="A finished job of this API key.")
    speaker: str | None = Field(None, min_length=1, max_length=64, description="Its speaker label, e.g. SPEAKER_01.")


class Sample(BaseModel):
    source: str
    duration: float | None = None
    speech: float | None = None
    added_at: float | None = None


class Speaker(BaseModel):
    id: str
    name: str
    samples: list[Sample]
    created_at: float
    updated_at: float


class Enrolling(BaseModel):
    id: str
    status: str = Field("enrolling", description="No worker embedded the sample in time; it still will.")


class SpeakerList(BaseModel):
    speakers: list[Speaker]


ENROLL_DOCS: dict[int | str, dict[str, Any]] = {
    202: {"model": Enrolling, "description": "Not embedded within ECG_SPEAKER_ENROLL_WAIT_S; see Location"},
    **NOT_FOUND,
    **UNAVAILABLE,
    422: {"description": "SAMPLE_DURATION, SAMPLE_NO_SPEECH, SAMPLE_MULTIPLE_VOICES, INVALID_MEDIA, VALIDATION_ERROR"},
}
BODY_DOC = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "file": {"type": "string", "format": "binary"}},
                }
            },
            "application/json": {"schema": FromJob.model_json_schema()},
        }
    }
}


@router.post(
    SPEAKERS_PATH,
    status_code=201,
    response_model=Speaker,
    responses=ENROLL_DOCS,
    openapi_extra=BODY_DOC,
    summary="Enroll a voice: a 5-60 s sample of it, or a speaker of a finished job",
)
async def create_speaker(request: Request, shim: ShimDep, caller: CurrentKey) -> Any:
    library = SpeakerLibrary(shim.r)
    if await run_in_threadpool(library.count, caller.fingerprint) >= shim.settings.max_speakers_per_key:
        raise ApiError(409, "SPEAKER_LIMIT", f"this API key has {shim.settings.max_speakers_per_key} speakers already")
    body, file = await _read_body(request, shim)
    if body.name is None:
        raise ApiError(422, "VALIDATION_ERROR", "name is required")
    speaker_id = uuid.uuid4().hex
    if file is not None:
        if not await _enroll_file(shim, caller, file, {"name": body.name, "speaker_id": speaker_id, "add": False}):
            return _enrolling(speaker_id)
        rec = await run_in_threadpool(library.get, caller.fingerprint, speaker_id)
    else:
        vector, sample = await run_in_threadpool(_job_voice, shim, caller, body)
        rec = await run_in_threadpool(library.create, caller.fingerprint, body.name, vector, sample)
    if rec is None:  # deleted between its enrollment and this read
        raise ApiError(404, "NOT_FOUND", "no such speaker")
    log.info("speaker_created", speaker_id=rec.id)
    return _public(rec)


@router.get(SPEAKERS_PATH, response_model=SpeakerList, summary="This API key's speakers")
def list_speakers(shim: ShimDep, caller: CurrentKey) -> SpeakerList:
    return SpeakerList(speakers=[_public(r) for r in SpeakerLibrary(shim.r).owned(caller.fingerprint)])


@router.get(SPEAKERS_PATH + "/{speaker_id}", response_model=Speaker, responses=NOT_FOUND)
def get_speaker(speaker_id: SpeakerId, shim: ShimDep, caller: CurrentKey) -> Speaker:
    return _public(_existing(SpeakerLibrary(shim.r), caller, speaker_id))


@router.patch(
    SPEAKERS_PATH + "/{speaker_id}",
    response_model=Speaker,
    responses=ENROLL_DOCS,
    openapi_extra=BODY_DOC,
    summary="Rename a speaker and/or add a sample (a file, or a speaker of a finished job)",
)
async def update_speaker(speaker_id: SpeakerId, request: Request, shim: ShimDep, caller: CurrentKey) -> Any:
    library = SpeakerLibrary(shim.r)
    await run_in_threadpool(_existing, library, caller, speaker_id)
    body, file = await _read_body(request, shim)
    if body.name is not None:
        await run_in_threadpool(lambda: library.update(caller.fingerprint, speaker_id, name=body.name))
    if file is not None:
        if not await _enroll_file(shim, caller, file, {"name": None, "speaker_id": speaker_id, "add": True}):
            return _enrolling(speaker_id)
    elif body.from_job is not None or body.speaker is not None:
        vector, sample = await run_in_threadpool(_job_voice, shim, caller, body)
        await run_in_threadpool(lambda: library.update(caller.fingerprint, speaker_id, add=(vector, sample)))
    return _public(await run_in_threadpool(_existing, library, caller, speaker_id))


@router.delete(
    SPEAKERS_PATH + "/{speaker_id}",
    status_code=204,
    response_class=Response,
    responses=NOT_FOUND,
    summary="Erase a speaker: its voiceprint and its samples' voiceprints, for good",
)
def delete_speaker(speaker_id: SpeakerId, shim: ShimDep, caller: CurrentKey) -> Response:
    library = SpeakerLibrary(shim.r)
    # a sample still waiting for a worker is cancelled, and its file deleted, too
    pending = library.cancel_pending(caller.fingerprint, speaker_id)
    if pending is not None:
        _drop_upload(shim, pending)
    if not library.delete(caller.fingerprint, speaker_id) and pending is None:
        raise ApiError(404, "NOT_FOUND", "no such speaker")
    log.info("speaker_deleted", speaker_id=speaker_id)
    return Response(status_code=204)


# --- helpers -------------------------------------------------------------------------------


def _existing(library: SpeakerLibrary, caller: Caller, speaker_id: str) -> SpeakerRecord:
    rec = library.get(caller.fingerprint, speaker_id)
    if rec is None:
        if library.is_pending(caller.fingerprint, speaker_id):
            raise ApiError(404, "SPEAKER_ENROLLING", "the sample is not embedded yet: retry shortly")
        raise ApiError(404, "NOT_FOUND", "no such speaker")
    return rec


def _enrolling(speaker_id: str) -> JSONResponse:
    return JSONResponse(
        status_code=202,
        content=Enrolling(id=speaker_id).model_dump(),
        headers={"Location": f"{SPEAKERS_PATH}/{speaker_id}"},
    )


def _public(rec: SpeakerRecord) -> Speaker:
    return Speaker.model_validate(rec.public())


async def _read_body(request: Request, shim: Shim) -> tuple[FromJob, UploadFile | None]:
    """JSON ``{name, from_job, speaker}``, or a multipart form ``name`` + ``file`` (the sample)."""
    declared = request.headers.get("content-length", "")
    multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
    cap = shim.settings.max_sample_bytes if multipart else MAX_JSON_BODY_BYTES
    # these routes are exempt from the shim's JSON body cap (a sample is larger): they cap here,
    # before a byte is read, and want the length declared
    if not declared.isdigit():
        raise ApiError(411, "LENGTH_REQUIRED", "send Content-Length")
    if int(declared) > cap:
        raise ApiError(413, "PAYLOAD_TOO_LARGE", f"body larger than {cap} bytes")
    if not multipart:
        try:
            return FromJob.model_validate_json(await request.body()), None
        except ValueError as e:
            raise ApiError(422, "VALIDATION_ERROR", str(e)) from None
    form = await request.form(max_files=1, max_fields=4)
    file = form.get("file")
    name = form.get("name")
    try:
        body = FromJob(name=name if isinstance(name, str) else None)
    except ValueError as e:
        raise ApiError(422, "VALIDATION_ERROR", str(e)) from None
    if file is not None and not isinstance(file, UploadFile):
        raise ApiError(422, "VALIDATION_ERROR", "file must be a file part")
    return body, file


def _job_voice(shim: Shim, caller: Caller, body: FromJob) -> tuple[list[float], dict[str, Any]]:
    if not body.from_job or not body.speaker:
        raise ApiError(422, "VALIDATION_ERROR", "give a sample file, or both from_job and speaker")
    rec = existing_job(shim.store, body.from_job, caller)
    if rec.status != JobStatus.COMPLETED:
        raise ApiError(409, "JOB_NOT_FINISHED", f"job {body.from_job} is {rec.status}; enroll from a completed job")
    vector = SpeakerLibrary(shim.r).job_voice(body.from_job, caller.fingerprint, body.speaker)
    if vector is None:
        raise ApiError(
            404,
            "SPEAKER_NOT_IN_JOB",
            f"job {body.from_job} has no voiceprint of {body.speaker!r} (its speakers are in its result; "
            "a job's voiceprints are kept as long as the job)",
        )
    return vector, {"source": f"job:{body.from_job}:{body.speaker}"}


async def _chunks(file: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await file.read(1 << 20):
        yield chunk


async def _enroll_file(shim: Shim, caller: Caller, file: UploadFile, request: dict[str, Any]) -> bool:
    """Store the sample as an upload, have a worker embed it, wait (with a deadline): True when
    it is enrolled, False when the worker has not answered in time (it goes on; a DELETE of the
    speaker meanwhile cancels it and deletes the file)."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    upload = (await save_upload(shim, _chunks(file))).video_url
    wait_s = shim.settings.speaker_enroll_wait_s
    payload = {**request, "owner": caller.fingerprint, "upload": upload}
    library = SpeakerLibrary(shim.r)
    try:
        await run_in_threadpool(
            library.mark_pending, caller.fingerprint, request["speaker_id"], upload, ENROLL_EXPIRES_S
        )
        result = shim.celery.send_task(ENROLL_TASK, args=[payload], expires=ENROLL_EXPIRES_S)
    except Exception as e:
        await run_in_threadpool(_drop_upload, shim, upload)
        raise ApiError(503, "QUEUE_UNAVAILABLE", "the job queue is unavailable; retry shortly") from e
    try:
        reply = await run_in_threadpool(lambda: result.get(timeout=wait_s, propagate=False))
    except CeleryTimeout:
        return False
    result.forget()
    if not isinstance(reply, dict):
        raise ApiError(500, "INTERNAL_ERROR", "the worker failed to embed the sample")
    code = reply.get("error_code")
    if code:
        if code == "NOT_FOUND":
            raise ApiError(404, "NOT_FOUND", "no such speaker")
        raise ApiError(422, str(code) if code in SAMPLE_CODES else "INVALID_SAMPLE", str(reply.get("error_message")))
    return True


def _drop_upload(shim: Shim, url: str) -> None:
    upload = upload_id(url)
    if upload is None:
        return
    if shim.bucket:
        shim.s3.delete_object(Bucket=shim.bucket, Key=s3_key(upload))
    else:
        (uploads_dir(shim.settings) / upload).unlink(missing_ok=True)
