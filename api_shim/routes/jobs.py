"""Jobs: submit (and wait), list, read, cancel, and a finished job's result and exports."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from api_shim.deps import Caller, CurrentKey, Shim, ShimDep, StoreDep
from api_shim.errors import CONFLICT, NOT_FOUND, PROTECTED_RESPONSES, UNAVAILABLE, ApiError
from api_shim.exports import MEDIA_TYPES, ExportFormat, render
from api_shim.listing import Cursor, list_jobs
from api_shim.schemas import Accepted, JobPage, JobState, JobSummary, ProcessRequest, from_record
from api_shim.submission import existing_job, job_state, state_of_async, submit, wait_until_done
from api_shim.view_tokens import view_url
from ecg_audio.jobs import JobStatus, is_terminal
from pipeline.errors import CancelledError, ProcessingError

router = APIRouter(tags=["jobs"], responses=PROTECTED_RESPONSES)


@router.post(
    "/api/upload-video/process-video",
    status_code=202,
    response_model=Accepted | JobState,
    responses={200: {"model": JobState}, **CONFLICT, **UNAVAILABLE},
    summary="Accept a job (idempotent on job_id)",
)
async def process_video(
    req: ProcessRequest, shim: ShimDep, caller: CurrentKey, accept_language: Annotated[str | None, Header()] = None
) -> Any:
    created, rec = await submit(shim, req, caller, accept_language)
    if created or rec is None:
        # the Accepted model's JSON, without validating a model built from values just checked
        return JSONResponse(
            status_code=202,
            content={"job_id": req.job_id, "status": JobStatus.QUEUED},
            headers={"Location": f"/jobs/{req.job_id}"},
        )
    return JSONResponse(status_code=200, content=(await state_of_async(shim, rec)).model_dump())


@router.post(
    "/transcribe",
    response_model=JobState,
    responses={202: {"model": JobState}, **CONFLICT, **UNAVAILABLE},
    summary="Submit and wait for the result",
)
async def transcribe(
    req: ProcessRequest, shim: ShimDep, caller: CurrentKey, accept_language: Annotated[str | None, Header()] = None
) -> Any:
    found = (await submit(shim, req, caller, accept_language))[1]
    rec = await wait_until_done(shim, req.job_id, found)
    code = 200 if is_terminal(rec.status) else 202
    headers = {"Location": f"/jobs/{req.job_id}"} if code == 202 else None
    return JSONResponse(status_code=code, content=(await state_of_async(shim, rec)).model_dump(), headers=headers)


@router.get("/jobs", response_model=JobPage, summary="This API key's jobs, newest first")
def get_jobs(
    store: StoreDep,
    caller: CurrentKey,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
) -> JobPage:
    after = Cursor.decode(cursor) if cursor else None
    recs, last = list_jobs(store, caller.fingerprint, limit=limit, status=status, cursor=after)
    jobs = [from_record(JobSummary, r) for r in recs]
    return JobPage(jobs=jobs, next_cursor=last.encode() if last else None)


@router.get("/jobs/{job_id}", response_model=JobState, responses=NOT_FOUND)
def get_job(job_id: str, shim: ShimDep, caller: CurrentKey, request: Request) -> JobState:
    rec = existing_job(shim.store, job_id, caller)
    result = _result_of(shim, rec.job_id) if rec.status == JobStatus.COMPLETED else None
    state = job_state(rec, result)
    state.queue_position = shim.progress.queue_position(rec)
    state.eta_s = shim.progress.eta_s(rec)
    state.view_url = view_url(shim.settings, rec.job_id, str(request.base_url), first_run=rec.first_run)
    return state


@router.delete("/jobs/{job_id}", response_model=JobState, responses=NOT_FOUND)
def cancel_job(job_id: str, store: StoreDep, caller: CurrentKey) -> JobState:
    rec = existing_job(store, job_id, caller)
    if not is_terminal(rec.status):
        store.mark_failed(job_id, CancelledError.code, "cancelled by request", rec.stage)
        rec = store.get(job_id) or rec
    env = store.get_result(job_id) if rec.status == JobStatus.COMPLETED else None
    return job_state(rec, env.get("result") if env else None)


@router.get(
    "/jobs/{job_id}/result",
    responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}}, **NOT_FOUND},
    summary="A finished job's result document (404 until it is completed)",
)
def get_result(job_id: str, shim: ShimDep, caller: CurrentKey) -> JSONResponse:
    result = _finished_result(shim, job_id, caller)
    return JSONResponse(result, headers={"Content-Disposition": f'inline; filename="{job_id}.json"'})


EXPORT_DOCS = {
    200: {"content": {m.split(";")[0]: {"schema": {"type": "string"}} for m in MEDIA_TYPES.values()}},
    **NOT_FOUND,
}


@router.get(
    "/jobs/{job_id}/exports/{fmt}",
    responses=EXPORT_DOCS,  # type: ignore[arg-type]
    summary="A finished job as subtitles (srt, vtt), diarization (rttm) or plain text (txt)",
)
def get_export(job_id: str, fmt: ExportFormat, shim: ShimDep, caller: CurrentKey) -> Response:
    result = _finished_result(shim, job_id, caller)
    export = render(result, job_id, fmt)
    return Response(
        export.text,
        media_type=export.media_type,
        headers={"Content-Disposition": f'attachment; filename="{job_id}.{fmt}"'},
    )


def _result_of(shim: Shim, job_id: str) -> dict[str, Any] | None:
    env = shim.store.get_result(job_id)
    return env.get("result") if env else None


def _finished_result(shim: Shim, job_id: str, caller: Caller) -> dict[str, Any]:
    rec = existing_job(shim.store, job_id, caller)
    if rec.status == JobStatus.FAILED:
        raise ApiError(
            404,
            rec.error_code or ProcessingError.code,
            f"job {job_id} failed, so it has no result: {rec.error_message}",
        )
    result = _result_of(shim, job_id) if rec.status == JobStatus.COMPLETED else None
    if result is None:
        raise ApiError(
            404,
            "RESULT_NOT_READY",
            f"job {job_id} has no result yet: it is {rec.status} ({rec.progress}%); "
            f"poll GET /jobs/{job_id} or wait for the final callback",
        )
    return result
