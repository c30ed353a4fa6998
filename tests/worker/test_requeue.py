"""Operator requeue: refuses a job that is still running (it would start a second chain) unless
--force, and each run of a job gets its own final event id."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace

import redis
from celery import Celery
from click.testing import CliRunner

from ecg_audio.jobs import JobStore


def _app(redis_url: str) -> Celery:
    import celeryconfig

    app = Celery("requeue-test")
    app.config_from_object(celeryconfig)
    app.conf.broker_url = app.conf.result_backend = redis_url
    return app


def _queued_messages(r: redis.Redis) -> int:
    return sum(int(r.llen(k)) for k in r.keys("cpu*"))  # type: ignore[union-attr]


def test_requeue_refuses_a_running_job_unless_forced(redis_url: str) -> None:
    from worker.ops_cli import jobs

    # a database no worker reads: the session's worker would take the requeued message at once
    redis_url = redis_url.rsplit("/", 1)[0] + "/7"
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    store = JobStore(r)
    job = f"rq-{uuid.uuid4().hex[:8]}"
    store.create(job, {"job_id": job, "video_url": "https://example.com/a.wav"})
    store.update(job, status="processing", progress=40, stage="diarize", message="Speakers found")
    obj = SimpleNamespace(app=_app(redis_url))
    before = _queued_messages(r)
    out = CliRunner().invoke(jobs, ["requeue", job], obj=obj)
    assert "not finished" in out.output, out.output
    assert out.exit_code != 0
    assert _queued_messages(r) == before  # no second chain
    rec = store.get(job)
    assert rec is not None and rec.status == "processing"
    out = CliRunner().invoke(jobs, ["requeue", "--force", job], obj=obj)
    assert out.exit_code == 0, out.output
    assert _queued_messages(r) == before + 1


def test_each_run_has_its_own_final_event_id(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    store = JobStore(r)
    job = f"rq-{uuid.uuid4().hex[:8]}"
    store.create(job, {"job_id": job, "video_url": "https://example.com/a.wav", "callback_url": "http://x/cb"})
    assert store.mark_failed(job, "DOWNLOAD_ERROR", "unreachable", "ingest")
    assert store.requeue(job)
    assert store.mark_failed(job, "DOWNLOAD_ERROR", "unreachable again", "ingest")
    finals = [json.loads(e)["event_id"] for e in r.lrange(f"ecg:cb:q:{job}", 0, -1)]
    assert finals == [f"{job}:final:1", f"{job}:final:2"], finals
