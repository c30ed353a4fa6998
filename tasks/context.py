"""What a stage task needs from its process: settings, the job store, the callback
outbox, and the models. The worker installs the model provider at process start;
tasks never import the worker package (dependencies point worker → tasks)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ecg_audio.callbacks import CallbackOutbox, DeliveryPolicy
from ecg_audio.jobs import JobStore
from ecg_audio.settings import Settings, get_settings
from ecg_audio.uploads import uploads_dir
from tasks.stages import ModelProvider, Reporter, StageEnv

_model_provider: Callable[[], ModelProvider] | None = None


def set_model_provider(provider: Callable[[], ModelProvider]) -> None:
    global _model_provider
    _model_provider = provider


def models() -> ModelProvider:
    if _model_provider is None:
        raise RuntimeError("no model provider: the worker installs one in worker_process_init")
    return _model_provider()


def settings() -> Settings:
    return get_settings()


@functools.lru_cache(maxsize=1)
def job_store() -> JobStore:
    s = get_settings()
    return JobStore.from_url(s.redis_url, s.job_ttl_s)


@functools.lru_cache(maxsize=1)
def outbox() -> CallbackOutbox:
    return make_outbox(get_settings())


def make_outbox(s: Settings) -> CallbackOutbox:
    import redis

    policy = DeliveryPolicy(
        timeout_s=s.callback_timeout_s,
        max_attempts=s.callback_max_attempts,
        backoff_base_s=s.callback_backoff_base_s,
        backoff_max_s=s.callback_backoff_max_s,
        deadline_s=s.callback_deadline_s,
    )
    from media_io.fetch import FetchLimits, GuardedHttp

    key = s.callback_signing_key.get_secret_value() if s.callback_signing_key else None
    # callbacks go through the same SSRF guard as downloads; a redirect is not followed
    guard = GuardedHttp(
        policy=url_policy(s), limits=FetchLimits(max_bytes=1 << 20, timeout_s=s.callback_timeout_s, max_redirects=0)
    )
    return CallbackOutbox(redis.Redis.from_url(s.redis_url), policy, key, guard)


def url_policy(s: Settings, *, allow_local_files: bool = False) -> Any:
    from media_io.urlguard import UrlPolicy

    schemes = {"https", "s3"} | ({"http"} if s.allow_http_urls else set())
    from ecg_audio.input_scope import s3_input_scope

    return UrlPolicy(
        allowed_schemes=frozenset(schemes),
        allow_private=s.allow_private_urls,
        allowlist=tuple(s.url_allowlist),
        allow_local_files=allow_local_files,
        **s3_input_scope(s),
    )


def s3_client_factory(s: Settings) -> Callable[[], Any]:
    def factory() -> Any:
        from ops.aws import client

        return client("s3", s)  # endpoint, region and timeouts from settings

    return factory


def stage_env(
    report: Reporter,
    *,
    settings: Settings | None = None,
    model_provider: ModelProvider | None = None,
    allow_local_files: bool = False,
) -> StageEnv:
    s = settings or get_settings()
    return StageEnv(
        workspace_root=s.workspace_root,
        output_root=s.output_root,
        models=model_provider or models(),
        report=report,
        batch_size=s.batch_size,
        max_download_bytes=s.max_download_bytes,
        max_duration_s=s.max_duration_s,
        network_timeout_s=s.network_timeout_s,
        url_policy=url_policy(s, allow_local_files=allow_local_files),
        s3_client_factory=s3_client_factory(s),
        fault_injection=s.fault_injection,
        keep_workspace=s.keep_workspace,
        uploads_dir=uploads_dir(s),
        s3_bucket=s.s3_bucket if s.workspace_backend == "s3" else None,
    )
