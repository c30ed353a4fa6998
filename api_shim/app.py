"""The thin HTTP door into the fleet: validate, enqueue by task name, read state.

It imports neither torch nor the task code: jobs are sent as a chain of task *names*
(``celeryconfig.CHAIN``), and state is read from the job records the workers keep in Redis.

Rooms: ``routes/`` (one ``APIRouter`` per resource), ``deps`` (the ``Annotated``
dependencies: shim state, stores, the caller's API key), ``schemas`` (request and response
models), ``submission`` (checking and enqueueing a job), ``errors`` (how errors answer).
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI

from api_shim.deps import Shim, make_celery
from api_shim.errors import install_error_handlers
from api_shim.middleware import MAX_JSON_BODY_BYTES, UPLOAD_PATH, BodySizeLimit
from api_shim.probes import queue_depth
from api_shim.routes import events, health, jobs, openai, presign, uploads, view, webhooks
from api_shim.schemas import ProcessRequest
from ecg_audio.logs import configure_logging
from ecg_audio.settings import Settings

__all__ = ["ProcessRequest", "create_app", "make_celery", "queue_depth"]

log = structlog.get_logger("ecg.shim")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    from ecg_audio.callbacks import Dispatcher
    from media_io.policy import make_outbox  # torch-free

    shim: Shim = app.state.shim
    dispatcher = Dispatcher(make_outbox(shim.settings)).start()
    # What start-up built (FastAPI, pydantic, Celery: ~90,000 objects) lives as long as the
    # process; frozen, the collector stops scanning it (a full pass took ~20 ms, a latency spike).
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        dispatcher.stop()
        await shim.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    if settings is None:
        from ops.aws import settings_with_secrets  # secrets reach the environment first

        settings = settings_with_secrets()
    configure_logging(settings.log_level, settings.log_json)
    shim = Shim(settings)
    if not shim.key_digests:
        # closed by default: with no key configured no key can match, so every protected route answers 403
        log.warning("no_api_keys_configured", effect="every route but /health refuses every request")

    app = FastAPI(
        title="ECG Audio Analyzer",
        version="0.1.0",
        description="Who said what, when: submit a media URL, get a speaker-attributed transcript with word "
        "times and voice features. Every route but /health needs `Authorization: Bearer <API key>`.",
        lifespan=lifespan,
    )
    app.state.shim = shim
    # media is streamed by the routes that take it; everything else is a small JSON document
    media_paths = frozenset({UPLOAD_PATH, openai.OPENAI_PATH})
    app.add_middleware(BodySizeLimit, max_bytes=MAX_JSON_BODY_BYTES, exempt_paths=media_paths)
    install_error_handlers(app)
    routers = (jobs, uploads, presign, openai, health, events, view, webhooks)
    for module in routers:
        app.include_router(module.router)
    return app


def __getattr__(name: str) -> Any:
    # ``uvicorn api_shim.app:app`` builds the app on first access, not at import
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)
