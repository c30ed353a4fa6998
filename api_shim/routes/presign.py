"""Large uploads without the shim's disk: a presigned S3 PUT straight into ``uploads/``.

``POST /api/uploads`` streams the body through the shim, which spools it to its own
disk before copying it to the bucket: fine for a phone recording, not for a multi-GB
video. With the S3 backend, ``POST /api/uploads/presigned`` instead hands out a URL the
client PUTs the file to, signed with the shim's own credentials (the template's
``ShimUploadsPolicy``: ``s3:PutObject`` on ``uploads/*`` only). The job then names the
same ``upload://<id>`` as after a proxied upload, and the workers read
``s3://<bucket>/uploads/<id>`` as before.

The declared size is signed into the URL (``Content-Length``, Signature V4), so S3
refuses a body of any other size, and it must be within ``max_download_bytes`` and S3's 5 GiB limit for
one PUT. In local mode (no bucket) the route answers 404 and clients keep using
``POST /api/uploads``.
"""

from __future__ import annotations

import uuid

import structlog
from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api_shim.deps import CurrentKey, ShimDep
from api_shim.errors import PROTECTED_RESPONSES, ApiError
from ecg_audio.uploads import s3_key

log = structlog.get_logger(__name__)

PRESIGNED_PATH = "/api/uploads/presigned"
MAX_SINGLE_PUT_BYTES = 5 * 1024**3  # S3's limit for one PUT
URL_EXPIRES_S = 3600


class PresignRequest(BaseModel):
    bytes: int = Field(gt=0, description="Exact size of the file; S3 refuses a body of any other size.")
    content_type: str = Field("application/octet-stream", max_length=200, pattern=r"^[\w.+-]+/[\w.+-]+$")


class PresignedUpload(BaseModel):
    video_url: str = Field(description="Put this in the job's video_url once the PUT succeeded.")
    upload_url: str
    method: str = "PUT"
    headers: dict[str, str] = Field(description="Send exactly these headers with the PUT.")
    expires_in: int


router = APIRouter(tags=["uploads"], responses=PROTECTED_RESPONSES)


@router.post(
    PRESIGNED_PATH,
    status_code=201,
    response_model=PresignedUpload,
    responses={
        404: {"description": "No S3 backend: use POST /api/uploads"},
        413: {"description": "Larger than the shim accepts"},
        503: {"description": "The upload store is unavailable"},
    },
    summary="Get a presigned URL to PUT a large media file straight to the bucket",
)
async def presign_upload(req: PresignRequest, shim: ShimDep, _caller: CurrentKey) -> PresignedUpload:
    if not shim.bucket:
        raise ApiError(404, "NOT_FOUND", "presigned uploads need the S3 backend; use POST /api/uploads")
    limit = min(shim.settings.max_download_bytes, MAX_SINGLE_PUT_BYTES)
    if req.bytes > limit:
        raise ApiError(413, "PAYLOAD_TOO_LARGE", f"upload larger than {limit} bytes")
    new_id = uuid.uuid4().hex
    headers = {"Content-Type": req.content_type, "Content-Length": str(req.bytes)}
    try:
        url = await run_in_threadpool(
            shim.s3_v4.generate_presigned_url,
            "put_object",
            Params={
                "Bucket": shim.bucket,
                "Key": s3_key(new_id),
                "ContentType": req.content_type,
                "ContentLength": req.bytes,
            },
            ExpiresIn=URL_EXPIRES_S,
            HttpMethod="PUT",
        )
    except Exception as e:  # no credentials, a bad region: the client can retry later
        log.error("presign_failed", error=type(e).__name__)
        raise ApiError(503, "UPLOAD_STORE_UNAVAILABLE", "the upload store is unavailable; retry shortly") from e
    log.info("upload_presigned", upload_id=new_id, bytes=req.bytes)
    return PresignedUpload(video_url=f"upload://{new_id}", upload_url=url, headers=headers, expires_in=URL_EXPIRES_S)
