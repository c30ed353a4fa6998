"""A stage's progress reports: to the job record (and its event log), and to Celery's task state."""

from __future__ import annotations

from typing import Any

import redis
import structlog

from ecg_audio.jobs import is_terminal
from pipeline.errors import CancelledError
from tasks import context
from tasks.stages import JobSpec

log = structlog.get_logger("ecg.tasks")


def reporter(task: Any, job: JobSpec) -> Any:
    """``report(stage, progress, message)`` for ``job``'s stages run by ``task`` (a bound Celery task)."""
    store = context.job_store()

    def report(stage: str, progress: int, message: str) -> None:
        try:
            moved = store.events.progress(job.job_id, progress=progress, stage=stage, message=message)
        except redis.RedisError as e:
            # Redis away for a moment (a restart): the work goes on; the next milestone reports
            log.warning("progress_not_recorded", stage=stage, progress=progress, error=str(e))
            return
        if not moved:
            # the record refuses updates once the job is over (cancelled by DELETE /jobs/{id},
            # failed or finished elsewhere): stop this stage now rather than at the next stage
            # boundary (a long file's transcription runs for minutes). No record: carry on.
            rec = store.get(job.job_id)
            if rec is not None and is_terminal(rec.status):
                why = f" ({rec.error_code})" if rec.error_code else ""
                raise CancelledError(f"job {rec.status}{why}; the {stage} stage stopped")
            return
        if task.request.id:
            meta = {"job_id": job.job_id, "progress": progress, "message": message, "stage": stage}
            try:
                task.update_state(state="PROGRESS", meta=meta)  # Flower's view only
            except Exception as e:
                log.warning("progress_state_not_stored", error=str(e))

    return report
