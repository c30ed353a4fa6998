"""Jobs: submit (and wait), read, cancel."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api_shim.deps import CurrentKey, ShimDep, StoreDep
from api_shim.errors import NOT_FOUND, PROTECTED_RESPONSES, UNAVAILABLE, ApiError
from api_shim.schemas import Accepted, JobState, ProcessRequest
from api_shim.submission import existing_job, state_of, state_of_async, submit
from api_shim.view_tokens import view_url

router = APIRouter(tags=["jobs"], responses=PROTECTED_RESPONSES)


@router.post(
    "/api/upload-video/process-video",
    status_code=202,
    response_model=Accepted | JobState,
    responses={200: {"model": JobState}, **UNAVAILABLE},
    summary="Accept a job (idempotent on job_id)",
)
async def process_video(req: ProcessRequest, shim: ShimDep, caller: CurrentKey) -> Any:
    created, rec = await submit(shim, req)
    if created or rec is None:
        # the Accepted model's JSON, without validating a model built from values just checked
        return JSONResponse(status_code=202, content={"job_id": req.job_id, "status": "queued"})
    return JSONResponse(status_code=200, content=(await state_of_async(shim, rec)).model_dump())


@router.post(
    "/transcribe",
    response_model=JobState,
    responses={202: {"model": JobState}, **UNAVAILABLE},
    summary="Submit and wait for the result",
)
async def transcribe(req: ProcessRequest, shim: ShimDep, caller: CurrentKey) -> Any:
    found = (await submit(shim, req))[1]
    store = shim.async_store()
    rec = found or await store.get(req.job_id)
    if rec is None:  # created a moment ago and already forgotten (a Redis flush): say so plainly
        raise ApiError(503, "QUEUE_UNAVAILABLE", "the job queue is unavailable; retry shortly")
    deadline = time.monotonic() + shim.settings.transcribe_wait_s
    while rec.status not in ("completed", "failed") and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        rec = await store.get(req.job_id) or rec
    code = 200 if rec.status in ("completed", "failed") else 202
    return JSONResponse(status_code=code, content=(await state_of_async(shim, rec)).model_dump())


@router.get("/jobs/{job_id}", response_model=JobState, responses=NOT_FOUND)
def get_job(job_id: str, store: StoreDep, shim: ShimDep, caller: CurrentKey, request: Request) -> JobState:
    state = state_of(store, existing_job(store, job_id))
    state.view_url = view_url(shim.settings, job_id, str(request.base_url))
    return state


@router.delete("/jobs/{job_id}", response_model=JobState, responses=NOT_FOUND)
def cancel_job(job_id: str, store: StoreDep, caller: CurrentKey) -> JobState:
    rec = existing_job(store, job_id)
    if rec.status not in ("completed", "failed"):
        store.mark_failed(job_id, "CANCELLED", "cancelled by request", rec.stage)
        rec = store.get(job_id) or rec
    return state_of(store, rec)
