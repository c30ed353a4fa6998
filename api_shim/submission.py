"""Accepting a job: check the request, then create the record and queue the chain in one step.

Submission is the hot path (issue 7: a thousand jobs a second on two cores): it runs on the
event loop (an async Redis client, no thread-pool hop unless a host name must be resolved
for the SSRF check), and one Redis script creates the job record and pushes the chain's
first message, built by ``ecg_audio.chain.ChainMessages`` rather than by Celery's client
(whose publish cost more CPU than the rest of the request together).
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from typing import Any

import redis
import structlog
from starlette.concurrency import run_in_threadpool

from api_shim import dns
from api_shim.deps import Caller, Shim
from api_shim.errors import ApiError
from api_shim.schemas import JOB_ID_PATTERN, JobState, ProcessRequest, from_record
from ecg_audio.jobs import JobRecord, JobStatus, JobStore, is_terminal
from ecg_audio.languages import UnsupportedOptionError, check_job
from ecg_audio.messages import resolve_locale
from ecg_audio.uploads import upload_id
from pipeline.errors import DownloadError

log = structlog.get_logger("ecg.shim")

RETRY_AFTER_S = "5"  # seconds, after a temporary DNS failure at submission


def check_request(shim: Shim, req: ProcessRequest, resolve: Any = None) -> None:
    """Refuse (422) what no worker could run: a language or model the fleet lacks, a URL the policy refuses."""
    try:  # the one language and model rule (ecg_audio.languages), as the CLI and the worker apply it
        check_job(req.language, req.options.model, shim.settings)
    except UnsupportedOptionError as e:
        raise ApiError(422, UnsupportedOptionError.code, e.message) from None
    resolve = resolve or dns.resolve_with_deadline
    _check_source(shim, req.video_url, "video_url", resolve)
    if req.callback_url:
        _check_url(req.callback_url, "callback_url", shim.callback_policy, resolve)


def _check_source(shim: Shim, url: str, field: str, resolve: Any) -> None:
    if url.startswith("upload://"):
        if upload_id(url) is None:
            raise ApiError(422, DownloadError.code, f"{field}: malformed upload id")
        return
    _check_url(url, field, shim.source_policy, resolve)


def _check_url(url: str, field: str, policy: Any, resolve: Any) -> None:
    from media_io.urlguard import check_url
    from pipeline.errors import AnalysisError  # torch-free

    try:
        check_url(url, policy, resolve=resolve)
    except dns.NeedsDns:
        raise
    except AnalysisError as e:  # UrlRefused and friends carry a safe message
        if e.retryable:
            # a DNS failure that may pass (EAI_AGAIN, a silent name server): a backend treats a 4xx as
            # final, so this is a 503 that says when to try again
            raise ApiError(
                503, e.code, f"{field}: {e.message}; this may pass, retry shortly", {"Retry-After": RETRY_AFTER_S}
            ) from None
        raise ApiError(422, e.code, f"{field}: {e.message}") from None
    except Exception:
        raise ApiError(422, DownloadError.code, f"{field}: URL not accepted") from None


async def check_request_async(shim: Shim, req: ProcessRequest) -> None:
    """``check_request`` on the event loop; in the thread pool only when a host name must be
    resolved (a resolver that does not answer must not stall the loop)."""
    try:
        check_request(shim, req, dns.no_dns)
    except dns.NeedsDns:
        await run_in_threadpool(check_request, shim, req)


async def submit(
    shim: Shim,
    req: ProcessRequest,
    caller: Caller,
    accept_language: str | None = None,
    *,
    admitted: bool = False,
) -> tuple[bool, JobRecord | None]:
    """Check, then create the record (owned by the caller's key) and queue the chain in one Redis script.

    ``(True, None)`` for a new job; ``(False, its record)`` when the job_id is known with the same
    request from the same key (nothing is queued again, and the repeat does not count towards the
    key's rate: a backend retrying a POST whose answer it lost is not submitting more work); 409
    when it is known otherwise. The script writes both or neither, so a failure leaves nothing to
    undo; a reply lost after Redis ran it makes a retry find the job (200), never queue it twice.
    ``admitted``: the caller already passed the key's limits for this job (a route that stores an
    upload first admits before it stores a byte).
    """
    await check_request_async(shim, req)
    if req.options.speakers:
        await run_in_threadpool(check_speakers, shim, req.options.speakers, caller)
    body = req.model_dump(mode="json")  # the request's identity: what the caller sent
    store = shim.async_store()
    try:
        known = await store.get(req.job_id)
        if known is not None:
            same_job(known, body, caller)
            return False, known
        if not admitted:
            await shim.admit(caller, req.job_id)
        created, rec = await store.create_or_get(
            req.job_id,
            with_header_locale(body, accept_language, shim.settings.default_locale),
            message=shim.messages.build(req.job_id),
            owner=caller.fingerprint,
        )
    except redis.RedisError as e:
        log.error("enqueue_failed", job_id=req.job_id, error=type(e).__name__)
        raise ApiError(503, "QUEUE_UNAVAILABLE", "the job queue is unavailable; retry shortly") from e
    if created:
        log.info("job_accepted", job_id=req.job_id)
    elif rec is not None:  # created by a concurrent request a moment ago
        same_job(rec, body, caller)
    return created, rec


# A locale taken from Accept-Language is stored in the job's options (the workers speak it) and
# marked so, because it is not part of what the caller sent: the same body with another header is
# the same job.
HEADER_LOCALE = "locale_from_header"


def with_header_locale(body: dict[str, Any], accept_language: str | None, default: str) -> dict[str, Any]:
    """``body`` as stored: messages in the caller's language unless the job names one (options.locale)."""
    options = body.get("options") or {}
    if options.get("locale") is not None or not accept_language:
        return body
    locale = resolve_locale(accept_language, default)
    return {**body, "options": {**options, "locale": locale}, HEADER_LOCALE: True}


def as_sent(request: dict[str, Any]) -> dict[str, Any]:
    """A stored request as its caller sent it (without a locale that came from a header)."""
    if not request.get(HEADER_LOCALE):
        return request
    options = {**(request.get("options") or {}), "locale": None}
    return {k: v for k, v in request.items() if k != HEADER_LOCALE} | {"options": options}


def check_speakers(shim: Shim, ids: list[str], caller: Caller) -> None:
    """422 for an ``options.speakers`` id that is not a speaker of the caller's key."""
    from ecg_audio.speakers import SpeakerLibrary, unknown_speakers

    unknown = unknown_speakers(SpeakerLibrary(shim.r), caller.fingerprint, ids)
    if unknown:
        listed = ", ".join(unknown)
        raise ApiError(422, "UNKNOWN_SPEAKER", f"options.speakers names no speaker of this API key: {listed}")


def same_job(rec: JobRecord, request: dict[str, Any], caller: Caller) -> None:
    """409 unless ``request`` from ``caller`` is the one that created ``rec`` (a repeat is idempotent).

    The answer names the differing fields, never their values nor the job's state: another key
    learns only that the job_id is taken.
    """
    if not visible_to(rec, caller):
        raise ApiError(409, "JOB_ID_CONFLICT", f"job_id {rec.job_id!r} is already taken: choose another job_id")
    stored = as_sent(rec.request)
    differ = sorted(k for k in request.keys() | stored.keys() if request.get(k) != stored.get(k))
    if differ:
        raise ApiError(
            409,
            "JOB_ID_CONFLICT",
            f"job_id {rec.job_id!r} was already submitted with a different {', '.join(differ)}: "
            "repeat the original body to read the job, or choose another job_id",
        )


def visible_to(rec: JobRecord, caller: Caller) -> bool:
    """A job belongs to the key that created it; a job with no owner (made by an operator's
    command, not through the shim) is visible to every key."""
    return rec.owner is None or hmac.compare_digest(rec.owner, caller.fingerprint)


async def wait_until_done(shim: Shim, job_id: str, rec: JobRecord | None) -> JobRecord:
    """The job's record once it is completed or failed, or when ECG_TRANSCRIBE_WAIT_S has passed."""
    store = shim.async_store()
    rec = rec or await store.get(job_id)
    if rec is None:  # created a moment ago and already forgotten (a Redis flush): say so plainly
        raise ApiError(503, "QUEUE_UNAVAILABLE", "the job queue is unavailable; retry shortly")
    deadline = time.monotonic() + shim.settings.transcribe_wait_s
    while not is_terminal(rec.status) and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        rec = await store.get(job_id) or rec
    return rec


# --- reading jobs ----------------------------------------------------------------------------


def job_state(rec: JobRecord, result: dict[str, Any] | None) -> JobState:
    return from_record(JobState, rec, result=result)


async def state_of_async(shim: Shim, rec: JobRecord) -> JobState:
    result = None
    if rec.status == JobStatus.COMPLETED:
        env = await shim.async_store().get_result(rec.job_id)
        result = env.get("result") if env else None
    return job_state(rec, result)


def existing_job(store: JobStore, job_id: str, caller: Caller) -> JobRecord:
    """The caller's job, or 404: for an id that could never be valid, and for another key's job
    (which must not learn that it exists)."""
    rec = store.get(job_id) if re.fullmatch(JOB_ID_PATTERN, job_id) else None
    if rec is None or not visible_to(rec, caller):
        raise ApiError(404, "NOT_FOUND", "no such job")
    return rec
