"""The job page: live progress, then the speaker timeline, talk time, transcript and downloads.

``GET /jobs/{id}/view?token=...`` is opened from the signed, expiring ``view_url`` of the job's
status, so a person needs no API key; the page's data, event stream and downloads accept the same
token. The page is three static files shipped in this package (``api_shim/static``): plain
HTML, CSS and JavaScript, no build step, nothing fetched from elsewhere (the Content-Security-
Policy says so to the browser too); its words are in the job's locale (``api_shim.page_text``).
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse, JSONResponse

from api_shim.deps import ShimDep
from api_shim.errors import NOT_FOUND, PROTECTED_RESPONSES, ApiError
from api_shim.exports import MEDIA_TYPES, ExportFormat, render
from api_shim.page_text import page_locale, render_page
from api_shim.routes.events import JobAccess, live_state
from ecg_audio.jobs import JobStatus

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


@router.get(
    "/jobs/{job_id}/view",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {}}}, **NOT_FOUND},
    summary="The job page (open the job's view_url)",
)
async def job_page(rec: JobAccess, shim: ShimDep) -> HTMLResponse:
    locale = page_locale(rec.request, shim.settings.default_locale)  # the job's, as its messages are
    return HTMLResponse(render_page(static_text("view.html"), locale), headers=PAGE_HEADERS)


@router.get("/view-assets/{name}", include_in_schema=False)
async def view_asset(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError(404, "NOT_FOUND", "no such file")
    return Response(static_text(name), media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=300"})


@router.get("/jobs/{job_id}/view/data", responses=NOT_FOUND, summary="The job page's data: status and result")
async def job_page_data(rec: JobAccess, shim: ShimDep) -> JSONResponse:
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
    return JSONResponse({"job": job, "result": result}, headers={"Cache-Control": "no-store"})


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
