"""Accepting a job: check the request, then create the record and queue the chain in one step.

Submission is the hot path (issue 7: a thousand jobs a second on two cores): it runs on the
event loop (an async Redis client, no thread-pool hop unless a host name must be resolved
for the SSRF check), and one Redis script creates the job record and pushes the chain's
first message, built by ``ecg_audio.chain.ChainMessages`` rather than by Celery's client
(whose publish cost more CPU than the rest of the request together).
"""

from __future__ import annotations

import re
from typing import Any

import redis
import structlog
from starlette.concurrency import run_in_threadpool

from api_shim import dns
from api_shim.deps import Shim
from api_shim.errors import ApiError
from api_shim.schemas import JOB_ID_PATTERN, JobState, ProcessRequest
from ecg_audio.jobs import JobRecord, JobStore
from ecg_audio.uploads import upload_id

log = structlog.get_logger("ecg.shim")

ENGLISH = {"en", "english"}


def check_request(shim: Shim, req: ProcessRequest, resolve: Any = None) -> None:
    """Refuse (422) what no worker could run: a language or model the fleet lacks, a URL the policy refuses."""
    settings = shim.settings
    lang = (req.language or "").lower()
    if (
        lang
        and lang not in ENGLISH
        and not settings.asr_multilingual_model
        and (settings.asr_model == "embedded" or settings.asr_model.rstrip("/").endswith(".en"))
    ):
        raise ApiError(
            422,
            "UNSUPPORTED_OPTION",
            f"language {req.language!r} is not available: the configured ASR model is English-only "
            "(tiny.en). An operator must set ECG_ASR_MULTILINGUAL_MODEL (e.g. large-v3) on the workers.",
        )
    if req.options.model and req.options.model not in {settings.asr_model, settings.asr_multilingual_model}:
        raise ApiError(
            422, "UNSUPPORTED_OPTION", "options.model must name an ASR model the workers are configured with"
        )
    resolve = resolve or dns.resolve_with_deadline
    _check_source(shim, req.video_url, "video_url", resolve)
    if req.callback_url:
        _check_url(req.callback_url, "callback_url", shim.callback_policy, resolve)


def _check_source(shim: Shim, url: str, field: str, resolve: Any) -> None:
    if url.startswith("upload://"):
        if upload_id(url) is None:
            raise ApiError(422, "INVALID_URL", f"{field}: malformed upload id")
        return
    _check_url(url, field, shim.source_policy, resolve)


def _check_url(url: str, field: str, policy: Any, resolve: Any) -> None:
    from pipeline.urlguard import check_url  # torch-free

    try:
        check_url(url, policy, resolve=resolve)
    except dns.NeedsDns:
        raise
    except Exception as e:  # UrlRefused and friends carry a safe message
        msg = getattr(e, "message", None) or "URL not accepted"
        raise ApiError(422, "INVALID_URL", f"{field}: {msg}") from None


async def check_request_async(shim: Shim, req: ProcessRequest) -> None:
    """``check_request`` on the event loop; in the thread pool only when a host name must be
    resolved (a resolver that does not answer must not stall the loop)."""
    try:
        check_request(shim, req, dns.no_dns)
    except dns.NeedsDns:
        await run_in_threadpool(check_request, shim, req)


async def submit(shim: Shim, req: ProcessRequest) -> tuple[bool, JobRecord | None]:
    """Check, then create the record and queue the chain in one Redis script.

    ``(True, None)`` for a new job; ``(False, its record)`` when the job_id is known (nothing
    is queued again). The script writes both or neither, so a failure leaves nothing to undo;
    a reply lost after Redis ran it makes a retry find the job (200), never queue it twice.
    """
    await check_request_async(shim, req)
    try:
        created, rec = await shim.async_store().create_or_get(
            req.job_id, req.model_dump(mode="json"), message=shim.messages.build(req.job_id)
        )
    except redis.RedisError as e:
        log.error("enqueue_failed", job_id=req.job_id, error=type(e).__name__)
        raise ApiError(503, "QUEUE_UNAVAILABLE", "the job queue is unavailable; retry shortly") from e
    if created:
        log.info("job_accepted", job_id=req.job_id)
    return created, rec


# --- reading jobs ----------------------------------------------------------------------------


def job_state(rec: JobRecord, result: dict[str, Any] | None) -> JobState:
    return JobState(
        job_id=rec.job_id,
        status=rec.status,  # type: ignore[arg-type]
        progress=rec.progress,
        message=rec.message,
        stage=rec.stage,
        result=result,
        error_code=rec.error_code,
        error_message=rec.error_message,
        created_at=rec.created_at,
        updated_at=rec.updated_at,
    )


def state_of(store: JobStore, rec: JobRecord) -> JobState:
    result = None
    if rec.status == "completed":
        env = store.get_result(rec.job_id)
        result = env.get("result") if env else None
    return job_state(rec, result)


async def state_of_async(shim: Shim, rec: JobRecord) -> JobState:
    result = None
    if rec.status == "completed":
        env = await shim.async_store().get_result(rec.job_id)
        result = env.get("result") if env else None
    return job_state(rec, result)


def existing_job(store: JobStore, job_id: str) -> JobRecord:
    """The job's record, or 404 (an id that could never be valid is simply not found)."""
    rec = store.get(job_id) if re.fullmatch(JOB_ID_PATTERN, job_id) else None
    if rec is None:
        raise ApiError(404, "NOT_FOUND", "no such job")
    return rec
