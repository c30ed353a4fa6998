"""One Celery task per stage. Each is a few lines over ``tasks.stages``.

The base class owns the job lifecycle: progress (Celery ``PROGRESS`` state, the
job record, callbacks), the error model (bad input is never retried; network
faults are, three times, with backoff), and the final outcome, reported once.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from typing import Any

import redis
import structlog
from celery import Task, shared_task
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded, TimeLimitExceeded
from redis.exceptions import LockNotOwnedError

from ecg_audio import keys
from ecg_audio.jobs import JobStatus, is_terminal
from ecg_audio.messages import error_message, failed, text
from ecg_audio.stage_table import STAGE_BY_NAME, STAGE_NAMES
from pipeline.errors import AnalysisError, CancelledError, ProcessingError, StageCrashedError, StageTimeoutError
from tasks import context
from tasks.stages import JobSpec, job_locale, run_stage

log = structlog.get_logger("ecg.tasks")

NETWORK_RETRIES = 3
LEASE_TTL_S = 30.0
LEASE_RETRY_S = 5.0
REDIS_BACKOFF_S = 2.0  # before handing a message back while Redis is away (no hot loop)


class StageLease:
    """At most one run of a given job's stage at a time, across workers.

    A redis-py ``Lock`` (token-checked acquire, extend and release, each one atomic Redis
    script) with a short TTL, renewed by a thread while the stage runs: a worker that dies stops
    renewing, so its lease lapses within ``ttl_s`` and a redelivered copy can take over, while a
    live duplicate is kept waiting. A holder whose lease lapsed (a stalled process) finds ``lost``
    set instead of extending or releasing someone else's.
    """

    def __init__(self, client: Any, job_id: str, stage: str, *, ttl_s: float = LEASE_TTL_S) -> None:
        self.key = f"{keys.LEASE}{job_id}:{stage}"
        self.ttl_s = ttl_s
        self.lock = client.lock(self.key, timeout=ttl_s, blocking=False, thread_local=False)
        self.held = False
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StageLease:
        self.held = bool(self.lock.acquire(blocking=False))
        if self.held:
            self._thread = threading.Thread(target=self._renew, name="ecg-lease", daemon=True)
            self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.lock.reacquire()
            except LockNotOwnedError:
                # lapsed: while Redis was unreachable for longer than the TTL, or this process stalled.
                # Free: take it again, with the same token. Held by another: it is theirs now.
                try:
                    if self.lock.acquire(blocking=False, token=self.lock.local.token):
                        log.warning("lease_reacquired_after_lapse", key=self.key)
                        continue
                except Exception as e:  # Redis still away: try again next round
                    log.warning("lease_renew_failed", key=self.key, error=str(e))
                    continue
                self.lost.set()
                log.warning("lease_lost", key=self.key)
                return
            except Exception:  # a Redis hiccup: the next round tries again
                log.warning("lease_renew_failed", key=self.key)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.held:
            try:
                self.lock.release()
            except LockNotOwnedError:
                self.lost.set()
                log.warning("lease_lost", key=self.key)
            except Exception:
                log.warning("lease_release_failed", key=self.key)


def _maybe_crash(point: str, job_id: str) -> None:
    """Fault injection (tests and the chaos bench): ``crash:<point>:<n>`` kills this process the first
    n times a job reaches ``point`` (a stage name, or ``before_final``: the result stored, the job not
    yet reported), counted in Redis so that it survives the crash it causes; ``pause:<point>:<s>``
    sleeps there (a window for a DELETE). An optional 4th field limits a rule to job ids with that
    prefix."""
    rules = context.settings().fault_injection
    if not rules:
        return
    for rule in rules.split(","):
        # crash:<point>:<n>[:<job id prefix>]   pause:<point>:<seconds>[:<job id prefix>]
        parts = rule.strip().split(":")
        if len(parts) not in (3, 4) or parts[1] != point or not job_id.startswith(parts[3] if len(parts) == 4 else ""):
            continue
        if parts[0] == "crash":
            seen = int(context.job_store().r.incr(f"{keys.FAULT}{job_id}:{point}"))
            if seen <= int(parts[2]):
                log.warning("fault_injected_crash", point=point, n=seen)
                os.kill(os.getpid(), signal.SIGKILL)
        elif parts[0] == "pause":
            log.warning("fault_injected_pause", point=point, seconds=float(parts[2]))
            time.sleep(float(parts[2]))


class StageTask(Task):
    """Base for stage tasks: ``run_stage_task`` wraps a stage with the job lifecycle."""

    abstract = True
    acks_late = True
    # retries are counted by kind in the job record (network faults get NETWORK_RETRIES; waiting for a
    # duplicate's lease is not a fault and has no budget), not by Celery's one counter
    max_retries = None
    stage: str = ""

    def reporter(self, job: JobSpec) -> Any:
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
            if self.request.id:
                meta = {"job_id": job.job_id, "progress": progress, "message": message, "stage": stage}
                try:
                    self.update_state(state="PROGRESS", meta=meta)  # Flower's view only
                except Exception as e:
                    log.warning("progress_state_not_stored", error=str(e))

        return report

    def run_stage_task(self, stage: str, payload: dict[str, Any]) -> dict[str, Any]:
        """``payload`` is ``{"job_id": ...}``: the job itself (URLs, options) is read from its record, so
        no URL, token included, travels in task arguments, return values or their logs."""
        store = context.job_store()
        job_id = str(payload["job_id"])
        key = keys.job(job_id)
        structlog.contextvars.bind_contextvars(job_id=job_id, stage=stage)
        run: int | None = None
        try:
            rec = store.get(job_id)
            if rec is None:
                # no record (expired, or purged by an operator): nothing says what to run, nor whom to tell
                log.warning("chain_stopped_no_record")
                raise Ignore()
            job = JobSpec.from_request(job_id, rec.request)
            run = rec.run
            if is_terminal(rec.status):
                # cancelled, failed elsewhere, or a duplicate delivery after completion: stop the chain.
                # Whoever finished it emitted the final event; should it not have, this does (once).
                self._ensure_final(job_id, rec)
                log.info("chain_stopped", status=rec.status, error_code=rec.error_code)
                raise Ignore()
            env = context.stage_env(self.reporter(job))
            if stage == "merge" and store.get_result(job.job_id) is not None:
                # a redelivered merge after the result was stored: only the reporting is left
                self._complete(job, env, run)
                return {"job_id": job.job_id}
            with StageLease(store.r, job.job_id, stage) as lease:
                if not lease.held:
                    # the same stage of this job runs elsewhere (a redelivered duplicate): come back
                    # later, when its checkpoint will make this a no-op
                    log.info("stage_busy_elsewhere")
                    raise self.retry(countdown=LEASE_RETRY_S)
                # counted before any work, and taken back when the body returns or raises: what is left
                # counts the deliveries whose process died (a segfault, the OOM killer, a kill), so a
                # stage that dies every time ends here instead of being delivered for ever
                pipe = store.r.pipeline()
                pipe.hincrby(key, f"deliveries:{stage}", 1)
                pipe.hset(key, f"started:{stage}", "1")
                deliveries = int(pipe.execute()[0])
                limit = context.settings().max_stage_deliveries
                if deliveries > limit:
                    raise StageCrashedError(
                        f"the {stage} stage was started {limit} times and its process died each time "
                        "(killed, out of memory or crashed); giving up"
                    )
                try:
                    _maybe_crash(stage, job_id)
                    outcome = run_stage(stage, job, env)
                except SoftTimeLimitExceeded as e:
                    raise StageTimeoutError(f"the {stage} stage took longer than its time limit") from e
                finally:
                    store.r.hincrby(key, f"deliveries:{stage}", -1)
                if lease.lost.is_set():
                    # another delivery took over this stage: it publishes the next stage, not us
                    log.warning("stage_lease_lost_not_publishing")
                    raise Ignore()
                if not outcome.skipped:
                    # counted for operators and the chaos bench: a finished stage never runs twice
                    store.r.hincrby(key, f"runs:{stage}", 1)
                    if stage == "ingest":  # the audio's length, on the record: the shim's eta_s uses it
                        duration = env.workspace(job.job_id).read_json("ingest.json")["duration"]
                        store.update(job.job_id, duration=duration)
                elif self._next_started(store, key, stage):
                    # a duplicate delivery of a finished stage whose successor already runs (or ran):
                    # publishing the next stage again would start a second copy of the rest of the chain
                    log.info("duplicate_contained")
                    raise Ignore()
            if stage == "merge":
                self._complete(job, env, run)
            return {"job_id": job.job_id}
        except (Ignore, Retry, Reject):
            raise
        except (redis.ConnectionError, redis.TimeoutError) as e:
            # Redis away (a restart) while this stage reads or writes its bookkeeping: not the job's
            # fault, and failing it would need Redis anyway. The message goes back to its queue once
            # Redis answers; if even that fails it stays unacknowledged and worker.liveness restores it.
            # The checkpoint makes the next delivery resume where this one stopped.
            log.warning("stage_requeued_redis_unavailable", error=str(e))
            time.sleep(REDIS_BACKOFF_S)
            raise Reject(str(e), requeue=True) from e
        except CancelledError as e:
            # the record already says how the job ended (and its final event is out); the chain stops here
            log.info("stage_cancelled", reason=e.message)
            raise Ignore() from e
        except AnalysisError as e:
            if e.retryable:
                tries = int(store.r.hincrby(key, f"netretries:{stage}", 1))
                if tries <= NETWORK_RETRIES:
                    countdown = min(60.0, 2.0 * 2 ** (tries - 1)) * random.uniform(0.5, 1.0)
                    log.warning("stage_retry", code=e.code, error=e.message, retry=tries)
                    raise self.retry(exc=e, countdown=countdown) from e
            self._fail(job, stage, e, run)
            raise
        except Exception as e:
            log.exception("stage_crashed")
            err = ProcessingError(f"internal error in the {stage} stage ({type(e).__name__}); the team has the details")
            self._fail(job, stage, err, run)
            raise err from e
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "stage")

    @staticmethod
    def _next_started(store: Any, key: str, stage: str) -> bool:
        i = STAGE_NAMES.index(stage)
        if i + 1 >= len(STAGE_NAMES):
            return False
        nxt = STAGE_NAMES[i + 1]
        return bool(store.r.hexists(key, f"started:{nxt}"))

    @staticmethod
    def _ensure_final(job_id: str, rec: Any) -> None:
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

    def _complete(self, job: JobSpec, env: Any, run: int | None) -> None:
        store = context.job_store()
        envelope = store.get_result(job.job_id)
        if envelope is None:
            envelope = env.workspace(job.job_id).read_json("result.json")
            store.set_result(job.job_id, envelope)
        # the result is safe in Redis (and output/): the workspace can go before the job is
        # reported complete, so a client that sees 'completed' never sees leftovers
        if not env.keep_workspace:
            env.workspace(job.job_id).remove()
        _maybe_crash("before_final", job.job_id)
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
        import resource

        log.info(
            "video_processing_completed",
            event_id=event_id,
            duration=md["duration"],
            processing_time=md["processing_time"],
            peak_memory_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            speakers=md["speakers_detected"],
            segments=md["segments_created"],
        )

    def _fail(self, job: JobSpec, stage: str, err: AnalysisError, run: int | None) -> None:
        store = context.job_store()
        locale = job_locale(job)
        # the code's meaning in the job's locale, and the detail too where the catalog has it (err.key)
        detail = error_message(err.code, err.message, locale, key=err.key, values=err.values)
        summary = failed(err.code, err.message, locale, key=err.key, values=err.values)
        store.mark_failed(job.job_id, err.code, detail, stage, run=run, summary=summary)
        log.warning("job_failed", error_code=err.code, error=err.message)


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
