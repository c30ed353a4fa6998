"""How a job ends: completed (after merge), failed, or its final event ensured for a job already over.

The terminal state and the final event are written in one step (``JobEvents.finish``), once.
"""

from __future__ import annotations

import resource
from typing import Any

import structlog

from ecg_audio import live
from ecg_audio.jobs import JobStatus
from ecg_audio.messages import error_message, failed, text
from ecg_audio.stage_table import STAGE_BY_NAME
from pipeline.errors import AnalysisError
from tasks import context
from tasks.faults import maybe_crash
from tasks.stage_env import StageEnv
from tasks.stages import JobSpec, job_locale

log = structlog.get_logger("ecg.tasks")


def ensure_final(job_id: str, rec: Any) -> None:
    """A job found finished: whoever finished it emitted the final event; should it not have, this does
    (the event builder writes one final per run, whoever calls)."""
    completed = rec.status == JobStatus.COMPLETED
    context.job_store().events.finish(
        job_id,
        JobStatus(rec.status),
        stage=rec.stage,
        message=rec.message,
        error_code=rec.error_code,
        error_message=rec.error_message,
        result=(context.job_store().get_result(job_id) or {}).get("result") if completed else None,
        run=rec.run,
    )


def complete(job: JobSpec, env: StageEnv, run: int | None) -> None:
    """The result stored, the workspace gone, the job reported completed with its final event."""
    store = context.job_store()
    envelope = store.get_result(job.job_id)
    if envelope is None:
        envelope = env.workspace(job.job_id).read_json("result.json")
        finals = live.live_result(store.r, job.job_id)
        if finals is not None:  # a job that began as a live stream keeps what its client saw
            envelope["result"]["live"] = finals
        store.set_result(job.job_id, envelope)
    # the result is safe in Redis (and output/): the workspace can go before the job is
    # reported complete, so a client that sees 'completed' never sees leftovers
    if not env.keep_workspace:
        env.workspace(job.job_id).remove()
    maybe_crash(context.settings().fault_injection, "before_final", job.job_id, store.r)
    # the terminal state and the final event in one step; on a job cancelled meanwhile, the final
    # event says what the record says (failed/CANCELLED), once
    rc, event_id = store.events.finish(
        job.job_id,
        JobStatus.COMPLETED,
        stage="merge",
        message=text(STAGE_BY_NAME["merge"].done.key, job_locale(job, env)),
        progress=100,
        result=envelope["result"],
        run=run,
    )
    if rc != 1:
        log.info("completion_not_reported", code=rc)
        return
    md = envelope["result"]["metadata"]
    context.job_completed(float(md["processing_time"]))
    log.info(
        "video_processing_completed",
        event_id=event_id,
        duration=md["duration"],
        processing_time=md["processing_time"],
        peak_memory_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        speakers=md["speakers_detected"],
        segments=md["segments_created"],
    )


def fail(job: JobSpec, stage: str, err: AnalysisError, run: int | None) -> None:
    """The job failed at ``stage``: the code's meaning in the job's locale, the final event, the
    dead-letter list."""
    store = context.job_store()
    locale = job_locale(job)
    detail = error_message(err.code, err.message, locale, key=err.key, values=err.values)
    summary = failed(err.code, err.message, locale, key=err.key, values=err.values)
    store.mark_failed(job.job_id, err.code, detail, stage, run=run, summary=summary)
    log.warning("job_failed", error_code=err.code, error=err.message)
