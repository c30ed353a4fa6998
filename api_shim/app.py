"""The thin HTTP door into the fleet: validate, enqueue by task name, read state.

It imports neither torch nor the task code: jobs are sent as a chain of task *names*
(``celeryconfig.CHAIN``), and state is read from the job records the workers keep in Redis.

Rooms: ``routes/`` (one ``APIRouter`` per resource), ``deps`` (the shim's state and lifespan, the
``Annotated`` dependencies), ``schemas`` (request and response models), ``submission`` (checking
and enqueueing a job), ``errors`` (how errors answer).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from api_shim.deps import Shim, lifespan
from api_shim.errors import install_error_handlers
from api_shim.middleware import MAX_JSON_BODY_BYTES, UPLOAD_PATH, BodySizeLimit
from api_shim.routes import events, health, jobs, openai, presign, realtime, speakers, stream, uploads, view, webhooks
from ecg_audio.settings import Settings

DESCRIPTION = (
    "Who said what, when: submit a media URL, get a speaker-attributed transcript with word times and voice "
    "features. Every route but the open ones the README lists (health, docs, the job page's assets) needs "
    "`Authorization: Bearer <API key>`."
)


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(title="ECG Audio Analyzer", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.shim = shim = Shim.start(settings)
    # media is streamed by the routes that take it (voice samples too), capped while it arrives;
    # everything else is a small JSON document
    uploads_cap, samples_cap = shim.settings.max_download_bytes, shim.settings.max_sample_bytes
    media = {UPLOAD_PATH: uploads_cap, openai.OPENAI_PATH: uploads_cap}
    media |= {speakers.SPEAKERS_PATH: samples_cap, speakers.SPEAKERS_PATH + "/": samples_cap}
    app.add_middleware(BodySizeLimit, max_bytes=MAX_JSON_BODY_BYTES, media=media)
    install_error_handlers(app)
    for module in (jobs, uploads, presign, openai, health, events, view, speakers, webhooks, stream, realtime):
        app.include_router(module.router)
    return app


def __getattr__(name: str) -> Any:
    # ``uvicorn api_shim.app:app`` builds the app on first access, not at import
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)
