"""One Celery task per stage. Each is a few lines over ``tasks.stages``.

The base class runs each delivery through the job lifecycle of ``tasks.lifecycle`` (load, guard,
run, record, fail or retry): progress (Celery ``PROGRESS`` state, the job record, callbacks), the
error model (bad input is never retried; network faults are, with the backoff of
``ecg_audio.retry``), and the final outcome, reported once.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Task, shared_task
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded

from ecg_audio.stage_table import STAGE_BY_NAME, STAGE_NAMES
from pipeline.errors import StageTimeoutError
from tasks import context
from tasks.lifecycle import StageRun
from tasks.progress import reporter
from tasks.stages import JobSpec

log = structlog.get_logger("ecg.tasks")


class StageTask(Task):
    """Base for stage tasks: ``run_stage_task`` wraps a stage with the job lifecycle."""

    abstract = True
    acks_late = True
    # retries are counted by kind in the job record (network faults get NETWORK_RETRY.attempts; waiting for a
    # duplicate's lease is not a fault and has no budget), not by Celery's one counter
    max_retries = None
    stage: str = ""

    def reporter(self, job: JobSpec) -> Any:
        return reporter(self, job)

    def run_stage_task(self, stage: str, payload: dict[str, Any]) -> dict[str, Any]:
        """``payload`` is ``{"job_id": ...}``: the job itself (URLs, options) is read from its record, so
        no URL, token included, travels in task arguments, return values or their logs."""
        step = StageRun(self, stage, payload)
        structlog.contextvars.bind_contextvars(job_id=step.job_id, stage=stage)
        try:
            step.load()
            step.guard()
            if not step.already_merged():
                with step.lease() as lease:
                    outcome = step.run()
                    step.record(outcome, lease)
            step.complete()
            return {"job_id": step.job_id}
        except (Ignore, Retry, Reject):
            raise
        except Exception as e:
            step.fail_or_retry(e)
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "stage")

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Celery calls this in the worker's parent when a stage is killed at its hard time limit: the
        job fails with TIMEOUT_ERROR and its final event, instead of staying ``processing`` for ever."""
        if not isinstance(exc, TimeLimitExceeded):
            return
        payload = (args[0] if args else None) or (kwargs or {}).get("payload") or {}
        job_id = payload.get("job_id") if isinstance(payload, dict) else None
        if not job_id:
            return
        stage = next((s.name for s in STAGE_BY_NAME.values() if s.task_name == self.name), self.name)
        try:
            context.job_store().mark_failed(
                str(job_id), StageTimeoutError.code, f"the {stage} stage was stopped at its hard time limit", stage
            )
        except Exception:
            log.exception("timeout_report_failed", job_id=job_id)


def _stage_task(stage: str) -> Any:
    @shared_task(name=STAGE_BY_NAME[stage].task_name, bind=True, base=StageTask)
    def task(self: StageTask, payload: dict[str, Any]) -> dict[str, Any]:
        return self.run_stage_task(stage, payload)

    return task


# one task per row of the stage table (ecg_audio/stage_table.py)
STAGE_TASKS = {name: _stage_task(name) for name in STAGE_NAMES}


@shared_task(name="ecg.worker_info")
def worker_info() -> dict[str, Any]:
    """Which models this worker process has loaded, and how often (ops and tests)."""
    provider = context.models()
    stats = getattr(provider, "stats", None)
    return stats() if callable(stats) else {}


import tasks.speaker_tasks  # noqa: E402,F401  (registers ecg.speakers.enroll beside the stage tasks)
