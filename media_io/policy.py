"""The fleet's one URL policy and the callback outbox built on it, from settings (torch-free).

Media URLs, s3:// inputs and callback URLs all pass the same SSRF guard: the shim checks a
job's URLs with it at submission, the stages again when they fetch, and the callback
dispatchers (in the shim and in every worker) POST through it.

Where ``s3://`` inputs may point: the configured input locations, never the workspace. A
worker's role can read the workspace bucket, other jobs' ``temp/{job_id}/audio.wav`` included;
a job naming such an object would read another job's data. The policy therefore refuses such a
URL before any S3 call, with the same message as any other location outside
``ECG_S3_INPUT_PREFIXES``.
"""

from __future__ import annotations

import functools
from typing import Any

import redis

from ecg_audio.callbacks import CallbackOutbox, DeliveryPolicy
from ecg_audio.settings import Settings
from ecg_audio.webhook_secrets import WebhookSecrets
from media_io.http import FetchLimits, GuardedHttp, post_async
from media_io.urlguard import UrlPolicy

WORKSPACE_PREFIXES = ("temp/", "output/", "uploads/")


def s3_input_scope(settings: Any) -> dict[str, Any]:
    """``UrlPolicy`` fields: ``s3_inputs`` from ``ECG_S3_INPUT_PREFIXES`` (none configured: no s3:// input)
    and ``s3_denied``, the workspace bucket's prefixes."""
    bucket = getattr(settings, "s3_bucket", None)
    denied = tuple(f"{bucket}/{p}" for p in WORKSPACE_PREFIXES) if bucket else ()
    return {"s3_inputs": tuple(getattr(settings, "s3_input_prefixes", ()) or ()), "s3_denied": denied}


def url_policy(s: Settings, *, allow_local_files: bool = False) -> UrlPolicy:
    schemes = {"https", "s3"} | ({"http"} if s.allow_http_urls else set())
    return UrlPolicy(
        allowed_schemes=frozenset(schemes),
        allow_private=s.allow_private_urls,
        allowlist=tuple(s.url_allowlist),
        allow_local_files=allow_local_files,
        **s3_input_scope(s),
    )


def delivery_policy(s: Settings) -> DeliveryPolicy:
    return DeliveryPolicy(
        schedule_s=tuple(s.callback_retry_schedule_s),
        timeout_s=s.callback_timeout_s,
        deadline_s=s.callback_deadline_s,
        per_host=s.callback_max_per_host,
        max_inflight=s.callback_max_inflight,
    )


def make_outbox(s: Settings) -> CallbackOutbox:
    key = s.callback_signing_key.get_secret_value() if s.callback_signing_key else None
    # callbacks go through the same SSRF guard as downloads; a redirect is not followed
    guard = GuardedHttp(
        policy=url_policy(s), limits=FetchLimits(max_bytes=1 << 20, timeout_s=s.callback_timeout_s, max_redirects=0)
    )
    return CallbackOutbox(
        redis.Redis.from_url(s.redis_url), delivery_policy(s), key, functools.partial(post_async, guard)
    )


def webhook_secrets(s: Settings, client: redis.Redis) -> WebhookSecrets:
    key = s.callback_signing_key.get_secret_value() if s.callback_signing_key else None
    return WebhookSecrets(client, key, s.webhook_rotation_overlap_s)
