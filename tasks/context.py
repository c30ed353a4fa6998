"""What a stage task needs from its process: settings, the job store, the callback
outbox, and the models. The worker installs the model provider at process start;
tasks never import the worker package (dependencies point worker → tasks)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ecg_audio.callbacks import CallbackOutbox
from ecg_audio.jobs import JobStore
from ecg_audio.settings import Settings, get_settings
from ecg_audio.speakers import JobSpeakers, SpeakerLibrary
from ecg_audio.uploads import uploads_dir
from media_io.policy import make_outbox, url_policy
from tasks.stage_env import ModelProvider, Reporter, StageEnv

_model_provider: Callable[[], ModelProvider] | None = None


def set_model_provider(provider: Callable[[], ModelProvider]) -> None:
    global _model_provider
    _model_provider = provider


_job_completed: Callable[[float], None] | None = None


def set_job_completed_hook(hook: Callable[[float], None] | None) -> None:
    """What to call, once per job, when this process completes one (the worker's job metrics):
    the job's processing time in seconds, the sum of its stage times as in its result."""
    global _job_completed
    _job_completed = hook


def job_completed(processing_time_s: float) -> None:
    if _job_completed is not None:
        _job_completed(processing_time_s)


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
        speakers=job_speakers(),
    )


@functools.lru_cache(maxsize=1)
def job_speakers() -> JobSpeakers:
    """The speaker library as a job's stages see it: the candidates of the job's own API key."""
    s = get_settings()
    store = job_store()

    def owner_of(job_id: str) -> str | None:
        rec = store.get(job_id)
        return rec.owner if rec is not None else None

    return JobSpeakers(SpeakerLibrary(store.r), owner_of, s.job_ttl_s, s.speaker_match_threshold)
