"""Uploads: a media file streamed to the shared uploads store, named by an ``upload://`` id."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import structlog
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from api_shim.deps import CurrentKey, Shim, ShimDep
from api_shim.errors import PROTECTED_RESPONSES, UNAVAILABLE, ApiError
from api_shim.middleware import UPLOAD_PATH
from api_shim.schemas import UploadAccepted
from ecg_audio.uploads import sweep_uploads, upload_to_s3, uploads_dir

log = structlog.get_logger("ecg.shim")
router = APIRouter(tags=["uploads"], responses=PROTECTED_RESPONSES)


@router.post(
    UPLOAD_PATH,
    response_model=UploadAccepted,
    status_code=201,
    responses=UNAVAILABLE,
    summary="Upload a media file; use the returned video_url in a job",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload(request: Request, shim: ShimDep, caller: CurrentKey) -> UploadAccepted:
    refuse_declared_oversize(shim, request)
    await shim.check_rate(caller)  # a key past its rate stores nothing
    return await save_upload(shim, request.stream())


def refuse_declared_oversize(shim: Shim, request: Request) -> None:
    """413 before a byte is read when the declared length is over the cap."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > shim.settings.max_download_bytes:
        raise ApiError(413, "PAYLOAD_TOO_LARGE", f"upload larger than {shim.settings.max_download_bytes} bytes")


async def save_upload(shim: Shim, chunks: AsyncIterator[bytes]) -> UploadAccepted:
    """Stream ``chunks`` into the uploads store (S3 when configured) under a new id."""
    settings = shim.settings
    too_big = f"upload larger than {settings.max_download_bytes} bytes"
    uploads = uploads_dir(settings)
    uploads.mkdir(parents=True, exist_ok=True)
    new_id = uuid.uuid4().hex
    target = uploads / new_id
    tmp = uploads / f".{new_id}.part"
    size = 0
    try:
        with open(tmp, "wb") as fh:
            async for chunk in chunks:
                size += len(chunk)
                if size > settings.max_download_bytes:
                    raise ApiError(413, "PAYLOAD_TOO_LARGE", too_big)
                fh.write(chunk)
        if size == 0:
            raise ApiError(422, "EMPTY_UPLOAD", "the upload is empty")
        if shim.bucket:
            # the workers may be on other machines: the upload goes where they all look
            try:
                await run_in_threadpool(upload_to_s3, shim.s3, shim.bucket, new_id, tmp)
            except Exception as e:
                log.error("upload_store_failed", error=type(e).__name__)
                raise ApiError(503, "UPLOAD_STORE_UNAVAILABLE", "the upload store is unavailable; retry shortly") from e
        else:
            tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    if not shim.bucket and shim.sweep_throttle.due():
        removed = await run_in_threadpool(sweep_uploads, uploads, settings.upload_ttl_s)
        if removed:
            log.info("uploads_swept", count=removed)
    return UploadAccepted(video_url=f"upload://{new_id}", bytes=size)
