"""What a route needs, as ``Annotated`` dependencies: the shim's state, the job stores, the caller.

A route declares what it uses (``shim: ShimDep``, ``caller: CurrentKey``) and reads top to
bottom. ``CurrentKey`` is the one authentication rule: every protected route, in every
router, takes it.

The state (Redis clients, the job store, URL policies, API key digests) is built once by
``create_app`` (``Shim.start``) and kept on ``app.state.shim``; nothing here connects at import or at build
(the first request does), so an app can be built without a Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import hashlib
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import redis
import redis.asyncio
import structlog
from celery import Celery
from fastapi import Depends, FastAPI, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

import celeryconfig
from api_shim.errors import ApiError
from api_shim.eta import ProgressEstimator
from api_shim.limits import Limits, SubmissionLimiter, limiter_for
from api_shim.probes import HealthProbe
from ecg_audio.chain import ChainMessages
from ecg_audio.jobs import AsyncJobStore, JobStore
from ecg_audio.logs import configure_logging
from ecg_audio.settings import Settings
from ecg_audio.uploads import SweepThrottle, upload_bucket

if TYPE_CHECKING:
    from media_io.urlguard import UrlPolicy

log = structlog.get_logger("ecg.shim")


def make_celery(settings: Settings) -> Celery:
    app = Celery("ecg")
    app.config_from_object(celeryconfig)
    app.conf.broker_url = settings.redis_url
    app.conf.result_backend = settings.redis_url
    return app


def _redis_kwargs() -> dict[str, Any]:
    return {"decode_responses": True, "socket_timeout": 5, "socket_connect_timeout": 5}


class Shim:
    """The shim's long-lived state: one per app."""

    @classmethod
    def start(cls, settings: Settings | None = None) -> Shim:
        """The state of a new app: settings (secrets into the environment first), logging."""
        if settings is None:
            from ops.aws import settings_with_secrets

            settings = settings_with_secrets()
        configure_logging(settings.log_level, settings.log_json)
        shim = cls(settings)
        if not shim.key_digests:
            # closed by default: with no key configured no key can match, so every protected route answers 403
            log.warning("no_api_keys_configured", effect="every route but /health refuses every request")
        return shim

    def __init__(self, settings: Settings) -> None:
        from media_io.policy import url_policy  # the one URL policy of the fleet (torch-free)

        self.settings = settings
        self.r = redis.Redis.from_url(settings.redis_url, **_redis_kwargs())
        self.store = JobStore(self.r, settings.job_ttl_s)
        self.messages = ChainMessages.for_client(self.r)
        self.source_policy: UrlPolicy = url_policy(settings)
        # callbacks are POSTed over http(s); an s3:// callback means nothing
        self.callback_policy: UrlPolicy = dataclasses.replace(
            self.source_policy, allowed_schemes=self.source_policy.allowed_schemes - {"s3"}
        )
        self.key_digests = [_digest(k.get_secret_value()) for k in settings.api_keys if k.get_secret_value()]
        self.bucket = upload_bucket(settings)
        self.sweep_throttle = SweepThrottle()
        self._async_stores: list[tuple[asyncio.AbstractEventLoop, AsyncJobStore]] = []
        self.health = HealthProbe(self.r, lambda: self.celery)
        self.progress = ProgressEstimator(self.store)
        self.limits = Limits.from_settings(settings)
        self._limiters: dict[int, SubmissionLimiter] = {}

    @functools.cached_property
    def celery(self) -> Celery:
        return make_celery(self.settings)

    @functools.cached_property
    def s3(self) -> Any:
        """One boto3 client for the process (clients are thread-safe, and costly to build)."""
        from ops.aws import client

        return client("s3", self.settings)

    @functools.cached_property
    def s3_v4(self) -> Any:
        """An S3 client that signs with Signature V4 (only V4 signs Content-Length into a presigned URL)."""
        from botocore.config import Config

        from ops.aws import client

        return client("s3", self.settings, config=Config(signature_version="s3v4"))

    async def admit(self, caller: Caller, job_id: str) -> None:
        """The per-key limits (429 past them); nothing to do when none is configured."""
        await self._limit(caller, job_id)

    async def check_rate(self, caller: Caller) -> None:
        """429 when the key has used its submission rate, without using any of it: a route that
        stores an upload asks before it stores a byte."""
        await self._limit(caller, None)

    async def _limit(self, caller: Caller, job_id: str | None) -> None:
        if not self.limits.enabled:
            return
        store = self.async_store()
        limiter = self._limiters.get(id(store))
        if limiter is None:
            self._limiters = {id(store): limiter_for(store.r, self.limits)}
            limiter = self._limiters[id(store)]
        try:
            if job_id is None:
                await limiter.check_rate(caller.fingerprint)
            else:
                await limiter.admit(caller.fingerprint, job_id)
        except redis.RedisError as e:
            # the submission itself needs Redis and will answer 503: the limit must not hide that
            log.warning("limit_check_failed", error=type(e).__name__)

    def async_store(self) -> AsyncJobStore:
        """The async job store of the running event loop (uvicorn runs one; a test client may start several)."""
        loop = asyncio.get_running_loop()
        if self._async_stores and self._async_stores[0][0] is loop:
            return self._async_stores[0][1]
        client = redis.asyncio.Redis.from_url(self.settings.redis_url, **_redis_kwargs())
        self._async_stores[:] = [(loop, AsyncJobStore(client, self.settings.job_ttl_s))]
        return self._async_stores[0][1]

    async def close(self) -> None:
        for _loop, astore in self._async_stores:
            await astore.r.aclose()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The app's life: the callback dispatcher runs beside the routes, and the shim's clients close at the end."""
    from ecg_audio.callbacks import Dispatcher
    from media_io.policy import make_outbox  # torch-free

    shim: Shim = app.state.shim
    dispatcher = Dispatcher(make_outbox(shim.settings)).start()
    # What start-up built (FastAPI, pydantic, Celery) lives as long as the process; frozen, the
    # collector stops scanning it on every full pass (each pass was a latency spike for requests).
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        dispatcher.stop()
        await shim.close()


def get_shim(request: Request) -> Shim:
    return request.app.state.shim  # type: ignore[no-any-return]


ShimDep = Annotated[Shim, Depends(get_shim)]


def get_settings(shim: ShimDep) -> Settings:
    return shim.settings


def get_store(shim: ShimDep) -> JobStore:
    return shim.store


def get_async_store(shim: ShimDep) -> AsyncJobStore:
    return shim.async_store()


def get_redis(shim: ShimDep) -> redis.Redis:
    return shim.r


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
AsyncStoreDep = Annotated[AsyncJobStore, Depends(get_async_store)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]


# --- the caller ------------------------------------------------------------------------------

bearer = HTTPBearer(auto_error=False)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class Caller:
    """Who is calling: an accepted API key, known by its fingerprint (the key itself is never kept)."""

    fingerprint: str


# async: FastAPI would run a plain function dependency in the thread pool, a hop per request
async def require_key(shim: ShimDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise ApiError(
            status.HTTP_401_UNAUTHORIZED,
            "UNAUTHORIZED",
            "missing API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    given = _digest(creds.credentials)
    # compare against every key, always, in constant time (digests: equal lengths, no length leak)
    ok = False
    for k in shim.key_digests:
        ok |= hmac.compare_digest(given, k)
    if not ok:
        raise ApiError(status.HTTP_403_FORBIDDEN, "FORBIDDEN", "API key not accepted")
    return Caller(fingerprint=given[:16].hex())


CurrentKey = Annotated[Caller, Depends(require_key)]
