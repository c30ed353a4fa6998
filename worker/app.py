"""The Celery application of a worker machine.

Start it with ``celery -A worker.app worker -Q model,cpu --concurrency 1``. Models
load once per worker *process* in ``worker_process_init`` (never in the parent,
which therefore never touches CUDA) and stay loaded for every job after.
"""

from __future__ import annotations

import structlog
from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown

from ecg_audio.logs import configure_logging, quiet_model_warnings
from ecg_audio.settings import get_settings, offline_model_env

offline_model_env()
_settings = get_settings()
configure_logging(_settings.log_level, _settings.log_json)

app = Celery("ecg")
app.config_from_object("celeryconfig")
app.autodiscover_tasks(["tasks"], related_name="pipeline_tasks", force=True)

log = structlog.get_logger("ecg.worker")
_dispatcher = None


@worker_process_init.connect
def _init_process(**_: object) -> None:
    """Runs in each child process: load the models, start the callback dispatcher."""
    global _dispatcher
    import tasks.pipeline_tasks  # noqa: F401  (registers the tasks in this process)
    from ecg_audio.callbacks import Dispatcher
    from tasks import context
    from worker.models import get_registry

    quiet_model_warnings()
    configure_logging(_settings.log_level, _settings.log_json)
    registry = get_registry(_settings)
    context.set_model_provider(lambda: registry)
    from pipeline.workspace import sweep_stale

    swept = sweep_stale(_settings.workspace_root, _settings.workspace_stale_after_s)
    if swept:
        log.info("workspaces_swept", count=len(swept))
    if _settings.preload_models:
        registry.preload()
    log.info("worker_ready", **registry.stats())
    _dispatcher = Dispatcher(context.outbox()).start()


@worker_process_shutdown.connect
def _shutdown_process(**_: object) -> None:
    if _dispatcher is not None:
        _dispatcher.stop()
