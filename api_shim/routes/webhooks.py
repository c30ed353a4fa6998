"""Webhooks: a key's signing secret (read, rotate) and the replay of a job's dead-lettered callbacks.

Callbacks are signed the Standard Webhooks way with one ``whsec_`` secret per API key
(``ecg_audio.webhook_secrets``); a key sees and rotates only its own. Replay re-sends a job's
dead-lettered events in order with their original ``webhook-id`` (``CallbackOutbox.replay``).
"""

from __future__ import annotations

import datetime
import re

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api_shim.deps import CurrentKey, ShimDep
from api_shim.errors import NOT_FOUND, PROTECTED_RESPONSES, UNAVAILABLE, ApiError, problem_doc
from api_shim.submission import existing_job
from ecg_audio.callbacks import CallbackOutbox, UnknownEvent
from ecg_audio.webhook_secrets import WebhookSecrets

router = APIRouter(tags=["webhooks"], responses=PROTECTED_RESPONSES)

_EVENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,200}")


class WebhookSecret(BaseModel):
    secret: str = Field(..., description="whsec_<base64>: verify callbacks with it (any Standard Webhooks library)")


class RotatedSecret(WebhookSecret):
    previous_valid_until: datetime.datetime = Field(
        ..., description="Until then callbacks carry a signature with the previous secret too"
    )


class RotateRequest(BaseModel):
    overlap_s: float | None = Field(
        None, ge=0, le=7 * 24 * 3600, description="How long the previous secret keeps signing (default: the setting)"
    )


class ReplayRequest(BaseModel):
    since: str | None = Field(None, description="Only events after this event id (of the job's event log)")


class Replayed(BaseModel):
    job_id: str
    replayed: list[str] = Field(..., description="The event ids queued again, in the order they will be sent")


def _secrets(shim: ShimDep) -> WebhookSecrets:
    from media_io.policy import webhook_secrets  # torch-free

    secrets = webhook_secrets(shim.settings, shim.r)
    if not secrets.configured:
        raise ApiError(503, "WEBHOOKS_NOT_CONFIGURED", "callbacks are unsigned: the server has no signing key")
    return secrets


@router.get("/webhooks/secret", response_model=WebhookSecret, responses=UNAVAILABLE, summary="This key's secret")
def get_secret(shim: ShimDep, caller: CurrentKey) -> WebhookSecret:
    return WebhookSecret(secret=_secrets(shim).current(caller.fingerprint))


@router.post(
    "/webhooks/secret/rotate", response_model=RotatedSecret, responses=UNAVAILABLE, summary="A new secret for this key"
)
def rotate_secret(shim: ShimDep, caller: CurrentKey, req: RotateRequest | None = None) -> RotatedSecret:
    secret, until = _secrets(shim).rotate(caller.fingerprint, None if req is None else req.overlap_s)
    return RotatedSecret(secret=secret, previous_valid_until=datetime.datetime.fromtimestamp(until, datetime.UTC))


@router.post(
    "/jobs/{job_id}/callbacks/replay",
    response_model=Replayed,
    responses={**NOT_FOUND, 422: problem_doc("`since` is not an event of this job")},
    summary="Send the job's dead-lettered callbacks again",
)
def replay_callbacks(job_id: str, shim: ShimDep, caller: CurrentKey, req: ReplayRequest | None = None) -> Replayed:
    existing_job(shim.store, job_id, caller)
    since = None if req is None else req.since
    if since is not None and not _EVENT_ID.fullmatch(since):
        raise ApiError(422, "UNKNOWN_EVENT", "since: not an event id")
    from media_io.policy import delivery_policy  # torch-free

    outbox = CallbackOutbox(shim.r, delivery_policy(shim.settings))
    try:
        return Replayed(job_id=job_id, replayed=outbox.replay(job_id, since))
    except UnknownEvent as e:
        raise ApiError(422, "UNKNOWN_EVENT", str(e)) from e
