"""The Celery application of a worker machine.

Start it with ``celery -A worker.app worker -Q model,cpu --concurrency 1``. Models
load once per worker *process* in ``worker_process_init`` (never in the parent,
which therefore never touches CUDA) and stay loaded for every job after.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Celery, signals

from ecg_audio.logs import configure_logging, quiet_model_warnings
from ecg_audio.settings import offline_model_env
from ops.aws import settings_with_secrets

offline_model_env()
# secrets (AWS Secrets Manager, when configured) reach the environment before
# anything reads the settings, celeryconfig included
_settings = settings_with_secrets()
configure_logging(_settings.log_level, _settings.log_json)

app = Celery("ecg")
app.config_from_object("celeryconfig")
app.autodiscover_tasks(["tasks"], related_name="pipeline_tasks", force=True)

log = structlog.get_logger("ecg.worker")
_state: dict[str, Any] = {}

if _settings.scale_in_protection:
    from worker.scaling import connect_celery_signals

    connect_celery_signals()

if _settings.interruption_watch:
    from worker.interruption import connect_celery_signals as watch_interruptions

    watch_interruptions()


@signals.worker_init.connect
def _parent_ready(sender: Any = None, **_: object) -> None:
    """In the parent: heartbeat + held messages, so peers can restore them if this worker dies.
    Started at worker_init, not worker_ready (which waits for the pool's model loading, a minute or
    more): a restarted worker restores its previous life's messages without waiting for its models."""
    import redis

    from worker.liveness import Liveness

    _state["liveness"] = Liveness(
        redis.Redis.from_url(_settings.redis_url),
        app,
        interval_s=_settings.worker_heartbeat_s,
        dead_after_s=_settings.worker_dead_after_s,
    ).start()


@signals.task_received.connect
def _message_received(request: Any = None, **_: object) -> None:
    """In the parent, as a message arrives: note it as held before anything can kill us."""
    liveness = _state.get("liveness")
    if liveness is not None and request is not None:
        try:
            liveness.hold(getattr(getattr(request, "message", None), "delivery_tag", None))
        except Exception:  # never let bookkeeping refuse a task
            log.warning("liveness_hold_failed")


@signals.worker_shutdown.connect
def _parent_shutdown(**_: object) -> None:
    liveness = _state.pop("liveness", None)
    if liveness is not None:
        liveness.stop()


@signals.worker_process_init.connect
def _init_process(**_: object) -> None:
    """Runs in each child process: load the models, start the callback dispatcher."""
    import tasks.pipeline_tasks  # noqa: F401  (registers the tasks in this process)
    from ecg_audio.callbacks import Dispatcher
    from ecg_audio.uploads import sweep_uploads, uploads_dir
    from media_io.workspace import sweep_stale
    from ops.job_metrics import job_metrics_from_settings
    from tasks import context
    from worker.models import get_registry

    quiet_model_warnings()
    configure_logging(_settings.log_level, _settings.log_json)
    registry = get_registry(_settings)
    context.set_model_provider(lambda: registry)
    swept = sweep_stale(_settings.workspace_root, _settings.workspace_stale_after_s)
    if swept:
        log.info("workspaces_swept", count=len(swept))
    expired = sweep_uploads(uploads_dir(_settings), _settings.upload_ttl_s)
    if expired:
        log.info("uploads_swept", count=expired)
    consumed = set(app.amqp.queues.consume_from or {})
    # a worker that only serves the cpu queue (ingest, features, merge) needs no model
    if _settings.preload_models and (not consumed or "model" in consumed):
        registry.preload()
    if _settings.preload_models and (not consumed or "cpu" in consumed):
        # compile librosa's numba functions now, not in the first job's features stage (~20 s cold)
        from pipeline.features import warm_up

        log.info("features_warmed", seconds=round(warm_up(), 2))
    import gc

    # the models' object graph lives as long as the process: keep it out of the collector's
    # full passes (each costs ~0.26 s with the models loaded)
    gc.freeze()
    log.info("worker_ready", **registry.stats())
    _state["dispatcher"] = Dispatcher(context.outbox()).start()
    _state["metrics"] = job_metrics_from_settings(_settings)


@signals.task_prerun.connect
def _stage_started(task_id: str | None = None, task: Any = None, **_: object) -> None:
    metrics = _state.get("metrics")
    if metrics is not None and task_id and task is not None:
        metrics.stage_started(task_id, task.name.removeprefix("ecg."))


@signals.task_postrun.connect
def _stage_finished(task_id: str | None = None, state: str | None = None, retval: Any = None, **_: object) -> None:
    metrics = _state.get("metrics")
    if metrics is not None and task_id:
        ok = {"SUCCESS": True, "FAILURE": False}.get(state or "")
        # a failed task's retval is its exception; AnalysisError carries the job's error code
        code = getattr(retval, "code", None) if ok is False else None
        metrics.stage_finished(task_id, ok=ok, error_code=code if isinstance(code, str) else None)


@signals.worker_process_shutdown.connect
def _shutdown_process(**_: object) -> None:
    dispatcher = _state.pop("dispatcher", None)
    if dispatcher is not None:
        dispatcher.stop()
    metrics = _state.pop("metrics", None)
    if metrics is not None:
        metrics.close()
