"""The thin HTTP door into the fleet: validate, enqueue by task name, read state.

It imports neither torch nor the task code: jobs are sent as a chain of task
*names* (``celeryconfig.CHAIN``), and state is read from the job records the
workers keep in Redis.

Submission is the hot path (issue 7: a thousand jobs a second on two cores): it runs on
the event loop (an async Redis client, no thread-pool hop unless a host name must be
resolved for the SSRF check), and one Redis script creates the job record and pushes the
chain's first message, built by ``ecg_audio.chain.ChainMessages`` rather than by Celery's
client (whose publish cost more CPU than the rest of the request together).
"""

import asyncio
import concurrent.futures
import functools
import gc
import hmac
import re
import socket
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import redis
import redis.asyncio
import structlog
from celery import Celery
from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import celeryconfig
from ecg_audio.chain import ChainMessages
from ecg_audio.jobs import AsyncJobStore, JobRecord, JobStore
from ecg_audio.logs import configure_logging
from ecg_audio.settings import Settings
from ecg_audio.uploads import SweepThrottle, sweep_uploads, upload_bucket, upload_id, upload_to_s3, uploads_dir

log = structlog.get_logger("ecg.shim")

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ENGLISH = {"en", "english"}
UPLOAD_PATH = "/api/uploads"
# Job requests are small JSON documents; anything bigger is a mistake or an attack.
MAX_JSON_BODY_BYTES = 64 * 1024


# --- request and response models -------------------------------------------


class JobOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_speakers: int | None = Field(None, ge=1, le=32, description="Exact number of speakers, when known.")
    min_speakers: int | None = Field(None, ge=1, le=32)
    max_speakers: int | None = Field(None, ge=1, le=32)
    model: str | None = Field(None, max_length=200, description="ASR model; one of those the workers have.")

    @model_validator(mode="after")
    def _consistent(self) -> "JobOptions":
        if self.num_speakers is not None and (self.min_speakers is not None or self.max_speakers is not None):
            raise ValueError("give either num_speakers, or min_speakers/max_speakers, not both")
        if self.min_speakers is not None and self.max_speakers is not None and self.min_speakers > self.max_speakers:
            raise ValueError("min_speakers must not exceed max_speakers")
        return self


class ProcessRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(
        ...,
        min_length=1,
        max_length=128,
        pattern=JOB_ID_PATTERN,
        description="Your id for the job: letters, digits, '.', '_', '-'. Posting it again returns the same job.",
    )
    video_url: str = Field(..., min_length=1, max_length=2048, description="https://, s3://, or an upload:// id.")
    language: str | None = Field(None, min_length=2, max_length=16, pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z]{2,4})?$")
    callback_url: str | None = Field(None, min_length=1, max_length=2048)
    options: JobOptions = Field(default_factory=JobOptions)

    @field_validator("job_id")
    @classmethod
    def _no_dots_only(cls, v: str) -> str:
        if ".." in v:
            raise ValueError("job_id must not contain '..'")
        return v


class JobState(BaseModel):
    job_id: str
    status: Literal["queued", "processing", "completed", "failed"]
    progress: int = Field(ge=0, le=100)
    message: str = ""
    stage: str | None = None
    result: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    created_at: float | None = None
    updated_at: float | None = None


class Accepted(BaseModel):
    job_id: str
    status: str


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    broker: bool
    workers: int
    queue_depth: dict[str, int]


class UploadAccepted(BaseModel):
    video_url: str
    bytes: int


class ErrorBody(BaseModel):
    detail: Any


# every protected route can answer these; documented so clients (and schema checks) know their shape
PROTECTED_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No API key"},
    403: {"model": ErrorBody, "description": "API key not accepted"},
    413: {"model": ErrorBody, "description": "Request body too large"},
    422: {"model": ErrorBody, "description": "The request is malformed or not accepted; `detail` says why"},
}


# --- request body limit --------------------------------------------------------


def _send_413(max_bytes: int) -> JSONResponse:
    return JSONResponse(
        status_code=413,
        content={
            "detail": f"request body larger than {max_bytes} bytes ({max_bytes // 1024} KiB): job requests are "
            f"small JSON documents; send media with POST {UPLOAD_PATH}"
        },
    )


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` (413) on every route but the streamed upload.

    A declared Content-Length over the cap is refused before a byte is read; a chunked body is
    buffered up to the cap and refused as soon as it passes it, so no route ever parses more.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, exempt_paths: frozenset[str]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt_paths = exempt_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_413(self.max_bytes)(scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = bool(message.get("more_body", False))
            if len(body) > self.max_bytes:
                await _send_413(self.max_bytes)(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _printable(text: str) -> str:
    """Text safe to put in a JSON response: lone surrogates (from a hostile JSON key) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# --- wiring ------------------------------------------------------------------


def make_celery(settings: Settings) -> Celery:
    app = Celery("ecg")
    app.config_from_object(celeryconfig)
    app.conf.broker_url = settings.redis_url
    app.conf.result_backend = settings.redis_url
    return app


def queue_depth(
    r: redis.Redis, queues: tuple[str, ...] = (celeryconfig.MODEL_QUEUE, celeryconfig.CPU_QUEUE)
) -> dict[str, int]:
    """Messages waiting per queue, priority sub-queues included."""
    pipe = r.pipeline()
    names: list[str] = []
    for q in queues:
        for p in celeryconfig.PRIORITY_STEPS:
            names.append(q)
            pipe.llen(q if p == 0 else f"{q}\x06\x16{p}")
    out: dict[str, int] = dict.fromkeys(queues, 0)
    for q, n in zip(names, pipe.execute(), strict=True):
        out[q] += int(n)
    return out


bearer = HTTPBearer(auto_error=False)


class _NeedsDns(Exception):
    """Raised by the no-DNS resolver: this URL's check must resolve a name (in a thread)."""


def _no_dns(host: str, port: int) -> list[tuple[Any, ...]]:
    raise _NeedsDns(host)


def create_app(settings: Settings | None = None) -> FastAPI:
    if settings is None:
        from ecg_audio.aws import settings_with_secrets  # secrets reach the environment first

        settings = settings_with_secrets()
    configure_logging(settings.log_level, settings.log_json)
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5)
    store = JobStore(r, settings.job_ttl_s)
    celery_app = make_celery(settings)
    messages = ChainMessages.for_client(r)
    async_stores: list[tuple[asyncio.AbstractEventLoop, AsyncJobStore]] = []

    def async_store() -> AsyncJobStore:
        """The async job store of the running event loop (uvicorn runs one; a test client may start several)."""
        loop = asyncio.get_running_loop()
        if async_stores and async_stores[0][0] is loop:
            return async_stores[0][1]
        client = redis.asyncio.Redis.from_url(
            settings.redis_url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5
        )
        async_stores[:] = [(loop, AsyncJobStore(client, settings.job_ttl_s))]
        return async_stores[0][1]

    from ecg_audio.input_scope import s3_input_scope
    from pipeline.urlguard import UrlPolicy, check_url  # torch-free

    def _policy(schemes: set[str] | None = None) -> UrlPolicy:
        allowed = {"https", "s3"} | ({"http"} if settings.allow_http_urls else set())
        if schemes is not None:
            allowed &= schemes | ({"http"} if settings.allow_http_urls else set())
        return UrlPolicy(
            allowed_schemes=frozenset(allowed),
            allow_private=settings.allow_private_urls,
            allowlist=tuple(settings.url_allowlist),
            **s3_input_scope(settings),  # s3:// only from input locations, never the workspace
        )

    bucket = upload_bucket(settings)
    sweep_throttle = SweepThrottle()

    @functools.cache
    def s3_client() -> Any:
        """One boto3 client for the process (clients are thread-safe; building one costs ~50 ms)."""
        from ecg_audio.aws import client

        return client("s3", settings)

    source_policy = _policy()
    callback_policy = _policy({"https", "http"})
    keys = [k.get_secret_value().encode() for k in settings.api_keys if k.get_secret_value()]
    if not keys:
        # closed by default: with no key configured no key can match, so every protected route answers 403
        log.warning("no_api_keys_configured", effect="every route but /health refuses every request")

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        from ecg_audio.callbacks import Dispatcher
        from tasks.context import make_outbox  # torch-free

        dispatcher = Dispatcher(make_outbox(settings)).start()
        # What start-up built (FastAPI, pydantic, Celery: ~90,000 objects) lives as long as the
        # process; frozen, the collector stops scanning it (a full pass took ~20 ms, a latency spike).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            dispatcher.stop()
            for _loop, astore in async_stores:
                await astore.r.aclose()

    app = FastAPI(
        title="ECG Audio Analyzer",
        version="0.1.0",
        description="Who said what, when: submit a media URL, get a speaker-attributed transcript with word "
        "times and voice features. Every route but /health needs `Authorization: Bearer <API key>`.",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, max_bytes=MAX_JSON_BODY_BYTES, exempt_paths=frozenset({UPLOAD_PATH}))

    # async: FastAPI would run a plain function dependency in the thread pool, a hop per request
    async def require_key(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
        if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "missing API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        given = creds.credentials.encode()
        # compare against every key, always, in constant time
        ok = False
        for k in keys:
            ok |= hmac.compare_digest(given, k)
        if not ok:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "API key not accepted")
        return "key"

    Auth = Annotated[str, Depends(require_key)]

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # neither the input nor pydantic's ctx is echoed; a loc can hold a client's JSON key, so it is escaped
        errors = [
            {
                "loc": [_printable(str(p))[:200] for p in e.get("loc", ())],
                "msg": _printable(str(e.get("msg", "")))[:300],
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()[:20]
        ]
        return JSONResponse(status_code=422, content={"detail": errors})

    def state_of(rec: JobRecord, *, with_result: bool = True) -> JobState:
        result = None
        if rec.status == "completed" and with_result:
            env = store.get_result(rec.job_id)
            result = env.get("result") if env else None
        return _state(rec, result)

    async def state_of_async(rec: JobRecord) -> JobState:
        result = None
        if rec.status == "completed":
            env = await async_store().get_result(rec.job_id)
            result = env.get("result") if env else None
        return _state(rec, result)

    def _state(rec: JobRecord, result: dict[str, Any] | None) -> JobState:
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

    def check_request(req: ProcessRequest, resolve: Any = None) -> None:
        lang = (req.language or "").lower()
        if (
            lang
            and lang not in ENGLISH
            and not settings.asr_multilingual_model
            and (settings.asr_model == "embedded" or settings.asr_model.rstrip("/").endswith(".en"))
        ):
            raise HTTPException(
                422,
                f"language {req.language!r} is not available: the configured ASR model is English-only "
                "(tiny.en). An operator must set ECG_ASR_MULTILINGUAL_MODEL (e.g. large-v3) on the workers.",
            )
        if req.options.model and req.options.model not in {settings.asr_model, settings.asr_multilingual_model}:
            raise HTTPException(422, "options.model must name an ASR model the workers are configured with")
        resolve = resolve or resolve_with_deadline
        _check_source(req.video_url, "video_url", resolve)
        if req.callback_url:
            _check_url(req.callback_url, "callback_url", callback_policy, resolve)

    def _check_source(url: str, field: str, resolve: Any) -> None:
        if url.startswith("upload://"):
            if upload_id(url) is None:
                raise HTTPException(422, f"{field}: malformed upload id")
            return
        _check_url(url, field, source_policy, resolve)

    def _check_url(url: str, field: str, policy: UrlPolicy, resolve: Any) -> None:
        try:
            check_url(url, policy, resolve=resolve)
        except _NeedsDns:
            raise
        except Exception as e:  # UrlRefused and friends carry a safe message
            msg = getattr(e, "message", None) or "URL not accepted"
            raise HTTPException(422, f"{field}: {msg}") from None

    async def check_request_async(req: ProcessRequest) -> None:
        """``check_request`` on the event loop; in the thread pool only when a host name must be
        resolved (a resolver that does not answer must not stall the loop)."""
        try:
            check_request(req, _no_dns)
        except _NeedsDns:
            await run_in_threadpool(check_request, req)

    async def submit(req: ProcessRequest) -> tuple[bool, JobRecord | None]:
        """Check, then create the record and queue the chain in one Redis script.

        ``(True, None)`` for a new job; ``(False, its record)`` when the job_id is known (nothing
        is queued again). The script writes both or neither, so a failure leaves nothing to undo;
        a reply lost after Redis ran it makes a retry find the job (200), never queue it twice.
        """
        await check_request_async(req)
        try:
            created, rec = await async_store().create_or_get(
                req.job_id, req.model_dump(mode="json"), message=messages.build(req.job_id)
            )
        except redis.RedisError as e:
            log.error("enqueue_failed", job_id=req.job_id, error=type(e).__name__)
            raise HTTPException(503, "the job queue is unavailable; retry shortly") from e
        if created:
            log.info("job_accepted", job_id=req.job_id)
        return created, rec

    @app.post(
        "/api/upload-video/process-video",
        status_code=202,
        response_model=Accepted | JobState,
        responses={200: {"model": JobState}, **PROTECTED_RESPONSES, 503: {"model": ErrorBody}},
        summary="Accept a job (idempotent on job_id)",
    )
    async def process_video(req: ProcessRequest, _: Auth) -> Any:
        created, rec = await submit(req)
        if created or rec is None:
            # the Accepted model's JSON, without validating a model built from values just checked
            return JSONResponse(status_code=202, content={"job_id": req.job_id, "status": "queued"})
        return JSONResponse(status_code=200, content=(await state_of_async(rec)).model_dump())

    @app.post(
        "/transcribe",
        response_model=JobState,
        responses={202: {"model": JobState}, **PROTECTED_RESPONSES, 503: {"model": ErrorBody}},
        summary="Submit and wait for the result",
    )
    async def transcribe(req: ProcessRequest, _: Auth) -> Any:
        found = (await submit(req))[1]
        rec = found or await async_store().get(req.job_id)
        if rec is None:  # created a moment ago and already forgotten (a Redis flush): say so plainly
            raise HTTPException(503, "the job queue is unavailable; retry shortly")
        deadline = time.monotonic() + settings.transcribe_wait_s
        while rec.status not in ("completed", "failed") and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            rec = await async_store().get(req.job_id) or rec
        code = 200 if rec.status in ("completed", "failed") else 202
        return JSONResponse(status_code=code, content=(await state_of_async(rec)).model_dump())

    def existing_job(job_id: str) -> JobRecord:
        """The job's record, or 404 (an id that could never be valid is simply not found)."""
        rec = store.get(job_id) if re.fullmatch(JOB_ID_PATTERN, job_id) else None
        if rec is None:
            raise HTTPException(404, "no such job")
        return rec

    @app.get("/jobs/{job_id}", response_model=JobState, responses={**PROTECTED_RESPONSES, 404: {"model": ErrorBody}})
    def get_job(job_id: str, _: Auth) -> JobState:
        return state_of(existing_job(job_id))

    @app.delete("/jobs/{job_id}", response_model=JobState, responses={**PROTECTED_RESPONSES, 404: {"model": ErrorBody}})
    def cancel_job(job_id: str, _: Auth) -> JobState:
        rec = existing_job(job_id)
        if rec.status not in ("completed", "failed"):
            store.mark_failed(job_id, "CANCELLED", "cancelled by request", rec.stage)
            rec = store.get(job_id) or rec
        return state_of(rec)

    @app.post(
        UPLOAD_PATH,
        response_model=UploadAccepted,
        status_code=201,
        responses=PROTECTED_RESPONSES,
        summary="Upload a media file; use the returned video_url in a job",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def upload(request: Request, _: Auth) -> UploadAccepted:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > settings.max_download_bytes:
            raise HTTPException(413, f"upload larger than {settings.max_download_bytes} bytes")
        uploads = uploads_dir(settings)
        uploads.mkdir(parents=True, exist_ok=True)
        new_id = uuid.uuid4().hex
        target = uploads / new_id
        tmp = uploads / f".{new_id}.part"
        size = 0
        try:
            with open(tmp, "wb") as fh:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > settings.max_download_bytes:
                        raise HTTPException(413, f"upload larger than {settings.max_download_bytes} bytes")
                    fh.write(chunk)
            if size == 0:
                raise HTTPException(422, "the upload is empty")
            if bucket:
                # the workers may be on other machines: the upload goes where they all look
                try:
                    await run_in_threadpool(upload_to_s3, s3_client(), bucket, new_id, tmp)
                except Exception as e:
                    log.error("upload_store_failed", error=type(e).__name__)
                    raise HTTPException(503, "the upload store is unavailable; retry shortly") from e
            else:
                tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        if not bucket and sweep_throttle.due():
            removed = await run_in_threadpool(sweep_uploads, uploads, settings.upload_ttl_s)
            if removed:
                log.info("uploads_swept", count=removed)
        return UploadAccepted(video_url=f"upload://{new_id}", bytes=size)

    @app.get("/health", response_model=Health)
    def health() -> Health:
        try:
            r.ping()
            broker = True
            depth = queue_depth(r)
        except redis.RedisError:
            return Health(status="degraded", broker=False, workers=0, queue_depth={})
        try:
            workers = len(celery_app.control.ping(timeout=0.5) or [])
        except Exception:
            workers = 0
        return Health(status="ok" if workers else "degraded", broker=broker, workers=workers, queue_depth=depth)

    return app


# Submission resolves the media host (SSRF check). A name server that never answers would hold a
# request thread for the resolver's own timeouts (tens of seconds); a small pool and a deadline cap that.
DNS_DEADLINE_S = 3.0
_dns_pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="shim-dns")


def resolve_with_deadline(host: str, port: int) -> list[tuple[Any, ...]]:
    """``socket.getaddrinfo`` that gives up after DNS_DEADLINE_S (as a temporary DNS failure)."""
    future = _dns_pool.submit(socket.getaddrinfo, host, port)
    try:
        return list(future.result(timeout=DNS_DEADLINE_S))
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise socket.gaierror(socket.EAI_AGAIN, f"no DNS answer within {DNS_DEADLINE_S:g} s") from None


def __getattr__(name: str) -> Any:
    # ``uvicorn api_shim.app:app`` builds the app on first access, not at import
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)
