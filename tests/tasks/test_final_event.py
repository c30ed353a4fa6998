"""The final event goes out with the terminal state, matches it, and exactly once per run.

The merge stage runs in-process (the real task code, its result already stored, as on a
redelivered merge) against a real Redis; the outbox and the event log are read back raw.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

RESULT = {
    "result": {
        "metadata": {"duration": 1.0, "processing_time": 1.0, "speakers_detected": 1, "segments_created": 0},
        "segments": [],
    }
}


class NoModels:
    device = "cpu"

    def asr(self, language: str | None = None, *, device: str | None = None) -> tuple[Any, str]:
        raise AssertionError("no model is needed here")

    def diarization(self) -> tuple[Any, str]:
        raise AssertionError("no model is needed here")

    def aligner(self, language: str) -> tuple[Any, str] | None:
        raise AssertionError("no model is needed here")


@pytest.fixture
def tasks_env(stage_redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    redis_url = stage_redis_url
    monkeypatch.setenv("ECG_REDIS_URL", redis_url)
    monkeypatch.setenv("ECG_WORKSPACE_ROOT", str(tmp_path / "ws"))
    monkeypatch.setenv("ECG_OUTPUT_ROOT", str(tmp_path / "out"))
    from ecg_audio.settings import get_settings
    from tasks import context

    def clear() -> None:
        get_settings.cache_clear()
        context.job_store.cache_clear()
        context.outbox.cache_clear()

    clear()
    context.set_model_provider(lambda: NoModels())  # type: ignore[arg-type, return-value]
    yield redis.Redis.from_url(redis_url, decode_responses=True)
    clear()


def _job(r: redis.Redis, *, callback: str | None = "http://127.0.0.1:9/cb") -> str:
    from tasks import context

    job = f"fin-{uuid.uuid4().hex[:8]}"
    store = context.job_store()
    assert store.create(job, {"job_id": job, "video_url": "https://example.com/a.wav", "callback_url": callback})
    store.update(job, status="processing", progress=80, stage="features", message="Voice features measured")
    store.set_result(job, RESULT)
    return job


def _outbox(r: redis.Redis, job: str) -> list[dict[str, Any]]:
    return [json.loads(e) for e in r.lrange(f"ecg:cb:q:{job}", 0, -1)]


def _finals(r: redis.Redis, job: str) -> list[dict[str, Any]]:
    return [e["payload"] for e in _outbox(r, job) if e["payload"]["status"] in ("completed", "failed")]


def _merge(job: str) -> None:
    from celery.exceptions import Ignore

    from tasks.pipeline_tasks import STAGE_TASKS

    merge_task = STAGE_TASKS["merge"]

    try:
        merge_task.run_stage_task("merge", {"job_id": job})
    except Ignore:
        pass


def test_delete_during_merge_final_says_cancelled(tasks_env: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DELETE that lands while merge runs: the record says failed/CANCELLED, and so does the one final."""
    from tasks import context

    job = _job(tasks_env)
    real = context.stage_env

    def env_then_delete(*a: Any, **k: Any) -> Any:
        env = real(*a, **k)
        context.job_store().mark_failed(job, "CANCELLED", "cancelled by request", "merge")  # what DELETE does
        return env

    monkeypatch.setattr(context, "stage_env", env_then_delete)
    _merge(job)
    rec = context.job_store().get(job)
    assert rec is not None and rec.status == "failed" and rec.error_code == "CANCELLED"
    finals = _finals(tasks_env, job)
    assert len(finals) == 1, finals
    assert finals[0]["status"] == "failed" and finals[0]["error_code"] == "CANCELLED", finals[0]


def test_cancelled_job_emits_exactly_one_final(tasks_env: redis.Redis) -> None:
    from tasks import context

    job = _job(tasks_env)
    assert context.job_store().mark_failed(job, "CANCELLED", "cancelled by request", "features")
    _merge(job)  # the chain's next delivery finds the job over
    _merge(job)
    finals = _finals(tasks_env, job)
    assert len(finals) == 1 and finals[0]["error_code"] == "CANCELLED", finals


def test_crash_between_terminal_state_and_final_still_one_final(
    tasks_env: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process fails right after merge's work (here: the separate enqueue step, where there is one);
    the redelivered merge must still leave the job completed with exactly one final event."""
    from tasks import context

    class Broken:
        def enqueue(self, *a: Any, **k: Any) -> None:
            raise redis.ConnectionError("crash between the terminal state and the final event")

    job = _job(tasks_env)
    monkeypatch.setattr(context, "outbox", lambda: Broken())
    try:
        _merge(job)
    except Exception:
        pass
    monkeypatch.undo()
    _merge(job)  # the redelivery
    rec = context.job_store().get(job)
    finals = _finals(tasks_env, job)
    assert rec is not None and rec.status == "completed", rec
    assert len(finals) == 1 and finals[0]["status"] == "completed" and finals[0]["result"] == RESULT["result"], finals


def test_a_completed_job_reports_its_processing_time_once(tasks_env: redis.Redis) -> None:
    """The worker's job metrics (ProcessingTime, Stage=job, which ProcessingTimeAlarm watches) hear of
    each completed job once, with its result's processing time; not again on a redelivered merge."""
    from tasks import context

    heard: list[float] = []
    context.set_job_completed_hook(heard.append)
    try:
        job = _job(tasks_env)
        _merge(job)
        _merge(job)
    finally:
        context.set_job_completed_hook(None)
    assert heard == [RESULT["result"]["metadata"]["processing_time"]]


@pytest.mark.parametrize("callback", ["http://127.0.0.1:9/cb", None])
def test_every_event_goes_to_the_event_log(tasks_env: redis.Redis, callback: str | None) -> None:
    """Milestones and the final, with or without a callback_url, in the per-job stream; the same ids and
    bodies as the outbox."""
    from tasks import context

    job = _job(tasks_env, callback=callback)
    report = context.job_store().events
    assert report.progress(job, progress=85, stage="merge", message="Assembling")
    _merge(job)
    entries = tasks_env.xrange(f"ecg:job:{job}:events")
    payloads = [json.loads(f["payload"]) for _, f in entries]
    assert [p["status"] for p in payloads] == ["processing", "completed"], payloads
    assert all(f["event_id"] == p["event_id"] for (_, f), p in zip(entries, payloads, strict=True))
    assert payloads[-1]["event_id"] == f"{job}:final:1"
    assert tasks_env.ttl(f"ecg:job:{job}:events") > 0
    if callback:
        assert [e["payload"] for e in _outbox(tasks_env, job)] == payloads
    else:
        assert _outbox(tasks_env, job) == []


def test_duplicate_of_a_finished_stage_does_not_publish_the_next_again(tasks_env: redis.Redis) -> None:
    """A redelivered ingest whose checkpoint exists, while diarize already started: returning normally
    would make Celery publish diarize a second time. It stops the chain copy instead (Ignore)."""
    from celery.exceptions import Ignore

    from media_io.workspace import Workspace
    from tasks import context
    from tasks.pipeline_tasks import STAGE_TASKS

    ingest_task = STAGE_TASKS["ingest"]

    job = _job(tasks_env)
    ws = Workspace.open(context.settings().workspace_root, job)
    ws.write_json("ingest.json", {"duration": 1.0})
    tasks_env.hset(f"ecg:job:{job}", "started:diarize", "1")
    with pytest.raises(Ignore):
        ingest_task.run_stage_task("ingest", {"job_id": job})
    # the first delivery, before diarize started, still passes the chain on
    tasks_env.hdel(f"ecg:job:{job}", "started:diarize")
    assert ingest_task.run_stage_task("ingest", {"job_id": job}) == {"job_id": job}


def _deliver_in_child(job: str, stage: str) -> int:
    """One delivery of ``stage`` in a forked process (as a pool child runs it); returns its exit code."""
    from tests.helpers import Forked

    def child() -> None:
        from ecg_audio.settings import get_settings
        from tasks import context
        from tasks.pipeline_tasks import StageTask

        get_settings.cache_clear()
        context.job_store.cache_clear()
        task = StageTask()
        task.name = f"ecg.{stage}"
        task.run_stage_task(stage, {"job_id": job})

    code = Forked(child).start().join(120)
    assert code is not None, "the delivery neither finished nor died within 120 s"
    return code


def test_a_stage_that_kills_its_process_ends_after_n_deliveries(
    tasks_env: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Poison message: diarize SIGKILLs its own process on every delivery. After
    max_stage_deliveries (3) the next delivery fails the job with STAGE_CRASHED, its final event goes
    out, and it is on the dead-letter list."""
    from ecg_audio.settings import get_settings
    from tasks import context

    monkeypatch.setenv("ECG_FAULT_INJECTION", "crash:diarize:1000")
    get_settings.cache_clear()
    job = _job(tasks_env)
    codes = []
    for _ in range(4):
        codes.append(_deliver_in_child(job, "diarize"))
        tasks_env.delete(f"ecg:lease:{job}:diarize")  # the dead holder's lease lapses (30 s in production)
        rec = context.job_store().get(job)
        if rec is not None and rec.status == "failed":
            break
    assert codes[:3] == [-9, -9, -9], codes  # the first three deliveries died
    rec = context.job_store().get(job)
    assert rec is not None and rec.status == "failed" and rec.error_code == "STAGE_CRASHED", (rec, codes)
    assert len(codes) == 4 and "diarize" in (rec.error_message or "")
    finals = _finals(tasks_env, job)
    assert len(finals) == 1 and finals[0]["error_code"] == "STAGE_CRASHED", finals
    assert job in context.job_store().failed_ids(1000)


def test_hard_time_limit_fails_the_job(tasks_env: redis.Redis) -> None:
    """Celery kills the child at the hard limit and calls on_failure in the parent: the job must not
    stay 'processing' for ever."""
    from celery.exceptions import TimeLimitExceeded

    from tasks import context
    from tasks.pipeline_tasks import STAGE_TASKS

    transcribe_task = STAGE_TASKS["transcribe"]

    job = _job(tasks_env)
    transcribe_task.on_failure(TimeLimitExceeded(10800), f"{job}:transcribe:x", [{"job_id": job}], {}, None)
    rec = context.job_store().get(job)
    assert rec is not None and rec.status == "failed" and rec.error_code == "TIMEOUT_ERROR", rec
    finals = _finals(tasks_env, job)
    assert len(finals) == 1 and finals[0]["error_code"] == "TIMEOUT_ERROR"


def test_progress_reports_skip_while_redis_is_away(tasks_env: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis restart while a stage runs: its progress report fails, the stage must go on (it used to
    fail the stage, and with it the job, for a 10 s blip)."""
    from tasks import context
    from tasks.pipeline_tasks import STAGE_TASKS

    transcribe_task = STAGE_TASKS["transcribe"]
    from tasks.stages import JobSpec

    job = _job(tasks_env)
    report = transcribe_task.reporter(JobSpec(job_id=job, source="x"))
    client = context.job_store().r

    def down(*a: Any, **k: Any) -> Any:
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1. Connection refused.")

    monkeypatch.setattr(client, "evalsha", down)
    report("merge", 85, "Assembling")  # no exception
    monkeypatch.undo()
    report("merge", 86, "Assembling")
    rec = context.job_store().get(job)
    assert rec is not None and rec.progress == 86 and rec.status == "processing"


def test_lease_waits_do_not_spend_the_network_retry_budget(
    tasks_env: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery that waited 10 times for a duplicate's lease (Celery's retries = 10) then meets a
    network fault: it is retried (the fault's own budget is untouched), not failed at once."""
    from ecg_audio.retry import NETWORK_RETRY
    from ecg_audio.settings import get_settings
    from pipeline.errors import DownloadError
    from tasks import context
    from tasks.pipeline_tasks import STAGE_TASKS

    ingest_task = STAGE_TASKS["ingest"]

    monkeypatch.setenv("ECG_ALLOW_HTTP_URLS", "true")
    monkeypatch.setenv("ECG_URL_ALLOWLIST", '["127.0.0.1"]')
    get_settings.cache_clear()
    job = f"net-{uuid.uuid4().hex[:8]}"
    store = context.job_store()
    store.create(job, {"job_id": job, "video_url": "http://127.0.0.1:9/a.wav"})  # nothing listens on port 9
    ingest_task.push_request(retries=10)
    try:
        for _ in range(NETWORK_RETRY.attempts):
            with pytest.raises(DownloadError):  # outside a worker Celery's retry re-raises the fault
                ingest_task.run_stage_task("ingest", {"job_id": job})
            rec = store.get(job)
            assert rec is not None and rec.status != "failed", rec
        with pytest.raises(DownloadError):  # the budget spent: now the job fails
            ingest_task.run_stage_task("ingest", {"job_id": job})
    finally:
        ingest_task.pop_request()
    rec = store.get(job)
    assert rec is not None and rec.status == "failed" and rec.error_code == "DOWNLOAD_ERROR", rec


def test_redis_gone_after_the_stage_body_requeues_instead_of_failing(
    tasks_env: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage's work is done but Redis is restarting when its bookkeeping is written: the job must
    not be failed as an internal error (it used to be, once Redis was back); the message is handed
    back (Reject requeue) and the checkpoint makes the redelivery cheap."""
    from celery.exceptions import Reject

    from ecg_audio.retry import Backoff
    from media_io.workspace import Workspace
    from tasks import context, lifecycle
    from tasks.pipeline_tasks import STAGE_TASKS

    ingest_task = STAGE_TASKS["ingest"]

    monkeypatch.setattr(lifecycle, "REDIS_AWAY", Backoff(0.0, 0.0, jitter=0.0))
    job = _job(tasks_env)
    Workspace.open(context.settings().workspace_root, job).write_json("ingest.json", {"duration": 1.0})
    client = context.job_store().r

    def down(*a: Any, **k: Any) -> Any:
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1. Connection refused.")

    monkeypatch.setattr(client, "hexists", down)
    with pytest.raises(Reject):
        ingest_task.run_stage_task("ingest", {"job_id": job})
    monkeypatch.undo()
    rec = context.job_store().get(job)
    assert rec is not None and rec.status == "processing", rec
