"""A worker's start-up and the Celery signals it answers (``worker.app`` connects them).

Before the app reads its configuration (``configure``): the model caches are set offline, secrets
(AWS Secrets Manager, when configured) reach the environment before anything reads the settings,
``celeryconfig`` included, and logging is set up. Then, in the worker's parent, liveness (heartbeat
and held messages) and, in each child process, the models (loaded once, in
``worker_process_init``, never in the parent, which therefore never touches CUDA), the callback
dispatcher and the job metrics. Scale-in protection and the spot/lifecycle drain are connected
when the settings ask for them.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Celery, signals

from ecg_audio.logs import configure_logging, quiet_model_warnings
from ecg_audio.settings import offline_model_env
from ops.aws import settings_with_secrets

log = structlog.get_logger("ecg.worker")
_state: dict[str, Any] = {}


def configure(sender: Celery, **_: object) -> None:
    """``app.on_configure``: runs once per process, before the app reads ``celeryconfig``."""
    offline_model_env()
    settings = settings_with_secrets()
    configure_logging(settings.log_level, settings.log_json)
    _state.update(settings=settings, app=sender)
    signals.worker_init.connect(_parent_ready)
    signals.task_received.connect(_message_received)
    signals.worker_shutdown.connect(_parent_shutdown)
    signals.worker_process_init.connect(_init_process)
    signals.task_prerun.connect(_stage_started)
    signals.task_postrun.connect(_stage_finished)
    signals.worker_process_shutdown.connect(_shutdown_process)
    if settings.scale_in_protection:
        from worker.scaling import connect_celery_signals

        connect_celery_signals()
    if settings.interruption_watch:
        from worker.interruption import connect_celery_signals as watch_interruptions

        watch_interruptions()


def _parent_ready(sender: Any = None, **_: object) -> None:
    """In the parent: heartbeat + held messages, so peers can restore them if this worker dies.
    Started at worker_init, not worker_ready (which waits for the pool's model loading, a minute or
    more): a restarted worker restores its previous life's messages without waiting for its models."""
    import redis

    from worker.liveness import Liveness

    settings, app = _state["settings"], _state["app"]
    _state["liveness"] = Liveness(
        redis.Redis.from_url(settings.redis_url),
        app,
        interval_s=settings.worker_heartbeat_s,
        dead_after_s=settings.worker_dead_after_s,
    ).start()


def _message_received(request: Any = None, **_: object) -> None:
    """In the parent, as a message arrives: note it as held before anything can kill us."""
    liveness = _state.get("liveness")
    if liveness is not None and request is not None:
        try:
            liveness.hold(getattr(getattr(request, "message", None), "delivery_tag", None))
        except Exception:  # never let bookkeeping refuse a task
            log.warning("liveness_hold_failed")


def _parent_shutdown(**_: object) -> None:
    liveness = _state.pop("liveness", None)
    if liveness is not None:
        liveness.stop()


def _init_process(**_: object) -> None:
    """Runs in each child process: load the models, start the callback dispatcher."""
    import tasks.pipeline_tasks  # noqa: F401  (registers the tasks in this process)
    from ecg_audio.callbacks import Dispatcher
    from ecg_audio.uploads import sweep_uploads, uploads_dir
    from media_io.workspace import sweep_stale
    from ops.job_metrics import job_metrics_from_settings
    from tasks import context
    from worker.models import get_registry

    settings, app = _state["settings"], _state["app"]
    quiet_model_warnings()
    configure_logging(settings.log_level, settings.log_json)
    registry = get_registry(settings)
    context.set_model_provider(lambda: registry)
    swept = sweep_stale(settings.workspace_root, settings.workspace_stale_after_s)
    if swept:
        log.info("workspaces_swept", count=len(swept))
    expired = sweep_uploads(uploads_dir(settings), settings.upload_ttl_s)
    if expired:
        log.info("uploads_swept", count=expired)
    consumed = set(app.amqp.queues.consume_from or {})
    # a worker that only serves the cpu queue (ingest, features, merge) needs no model
    if settings.preload_models and (not consumed or "model" in consumed):
        registry.preload()
    if settings.preload_models and (not consumed or "cpu" in consumed):
        # compile librosa's numba functions now, not in the first job's features stage
        from pipeline.features import warm_up

        log.info("features_warmed", seconds=round(warm_up(), 2))
    import gc

    # the models' object graph lives as long as the process: keep it out of the collector's
    # full passes (each would walk every tensor and module of the loaded models)
    gc.freeze()
    log.info("worker_ready", **registry.stats())
    _state["dispatcher"] = Dispatcher(context.outbox()).start()
    metrics = _state["metrics"] = job_metrics_from_settings(settings)
    if metrics is not None:
        context.set_job_completed_hook(metrics.record_job_time)


def _stage_started(task_id: str | None = None, task: Any = None, **_: object) -> None:
    metrics = _state.get("metrics")
    if metrics is not None and task_id and task is not None:
        metrics.stage_started(task_id, task.name.removeprefix("ecg."))


def _stage_finished(task_id: str | None = None, state: str | None = None, retval: Any = None, **_: object) -> None:
    metrics = _state.get("metrics")
    if metrics is not None and task_id:
        ok = {"SUCCESS": True, "FAILURE": False}.get(state or "")
        # a failed task's retval is its exception; AnalysisError carries the job's error code
        code = getattr(retval, "code", None) if ok is False else None
        metrics.stage_finished(task_id, ok=ok, error_code=code if isinstance(code, str) else None)


def _shutdown_process(**_: object) -> None:
    dispatcher = _state.pop("dispatcher", None)
    if dispatcher is not None:
        dispatcher.stop()
    metrics = _state.pop("metrics", None)
    if metrics is not None:
        metrics.close()
