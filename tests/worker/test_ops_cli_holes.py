"""Operator commands, issue 23's holes, against a real Redis: ``jobs requeue --force`` on a completed
job recomputes instead of reporting the old result, and ``jobs purge-failed`` removes everything a job
owns, so that a job re-created under its id replays none of its events, reuses none of its event ids
(the final's included) and is not opened by its page links."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from celery import Celery
from click.testing import CliRunner

from api_shim.view_tokens import check_token, make_token
from ecg_audio import event_log
from ecg_audio.jobs import JobStatus, JobStore
from ecg_audio.settings import get_settings


@pytest.fixture
def cli(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    import celeryconfig

    # a database no worker reads: the session's worker would take a requeued message at once
    url = redis_url.rsplit("/", 1)[0] + "/7"
    monkeypatch.setenv("ECG_REDIS_URL", url)
    monkeypatch.setenv("ECG_WORKSPACE_ROOT", str(tmp_path / "workspaces"))
    monkeypatch.setenv("ECG_OUTPUT_ROOT", str(tmp_path / "output"))
    get_settings.cache_clear()
    app = Celery("ops-cli-holes-test")
    app.config_from_object(celeryconfig)
    app.conf.broker_url = app.conf.result_backend = url
    r = redis.Redis.from_url(url, decode_responses=True)
    yield SimpleNamespace(obj=SimpleNamespace(app=app), r=r, store=JobStore(r), root=tmp_path)
    get_settings.cache_clear()


def _invoke(cli: SimpleNamespace, *args: str) -> str:
    from worker.ops_cli import jobs

    out = CliRunner().invoke(jobs, list(args), obj=cli.obj)
    assert out.exit_code == 0, out.output
    return out.output


def test_forced_requeue_of_a_completed_job_recomputes(cli: SimpleNamespace) -> None:
    store, job = cli.store, f"rqc-{uuid.uuid4().hex[:8]}"
    store.create(job, {"job_id": job, "video_url": "https://example.com/a.wav"})
    old = {"job_id": job, "status": "completed", "result": {"segments": ["the old result"]}}
    store.set_result(job, old)
    ws = cli.root / "workspaces" / job
    ws.mkdir(parents=True)
    (ws / "result.json").write_text(json.dumps(old))  # a kept workspace's merge checkpoint
    done = store.events.finish(job, JobStatus.COMPLETED, stage="merge", message="Done", result=old["result"])
    assert done[0] == 1
    assert "already completed" in _invoke(cli, "requeue", job)  # without --force: nothing happens
    assert store.get_result(job) == old
    assert "requeued as run 2" in _invoke(cli, "requeue", "--force", job)
    rec = store.get(job)
    assert rec is not None and rec.status == "queued" and rec.run == 2
    # the merge stage finds no result to report (tasks/lifecycle.py: already_merged) and no checkpoint
    # to skip to: it computes the result again
    assert store.get_result(job) is None
    assert not (ws / "result.json").exists()


def test_purge_removes_everything_a_job_owns_and_a_recreated_id_starts_afresh(cli: SimpleNamespace) -> None:
    r, store, job = cli.r, cli.store, f"pg-{uuid.uuid4().hex[:8]}"
    request = {"job_id": job, "video_url": "https://example.com/a.wav", "callback_url": "http://127.0.0.1:9/cb"}
    created, _ = store.create_or_get(job, request, owner="fp-owner")
    assert created
    store.events.progress(job, progress=10, stage="ingest", message="Audio extracted")
    store.set_result(job, {"job_id": job})
    r.set(f"ecg:lease:{job}:diarize", "token")
    r.set(f"celery-task-meta-{job}:ingest:abcd1234", "{}")
    assert store.mark_failed(job, "DOWNLOAD_ERROR", "unreachable", "ingest")
    old_ids = [f["event_id"] for _, f in r.xrange(event_log.key(job))]
    assert old_ids[-1] == f"{job}:final:1"
    secret = b"view secret"
    old_link = make_token(secret, job, int(time.time()) + 600)
    outputs = cli.root / "output"
    outputs.mkdir()
    for name in (f"{job}.json", f"{job}.srt", f"{job}.x.json"):  # the last: job '<job>.x', not this one
        (outputs / name).write_text("{}")
    (cli.root / "workspaces" / job).mkdir(parents=True)

    assert "purged 1 failed jobs" in _invoke(cli, "purge-failed", "--yes")

    left = [k for k in r.scan_iter(match="*") if job in k]
    left += [k for k in r.keys("ecg:*") if r.type(k) == "zset" and r.zscore(k, job) is not None]
    assert left == [], left
    assert r.hget("ecg:jobs:retired_runs", job) == "1"  # all that is kept: the id's last run
    assert sorted(p.name for p in outputs.iterdir()) == [f"{job}.x.json"]
    assert not (cli.root / "workspaces" / job).exists()

    # the id again, another job: none of the earlier events, no earlier event id, not its page links
    created, _ = store.create_or_get(job, request, owner="fp-owner")
    assert created
    rec = store.get(job)
    assert rec is not None and rec.status == "queued" and store.get_result(job) is None
    assert r.xlen(event_log.key(job)) == 0
    store.events.progress(job, progress=10, stage="ingest", message="Audio extracted")
    assert store.mark_failed(job, "DOWNLOAD_ERROR", "unreachable again", "ingest")
    new_ids = [f["event_id"] for _, f in r.xrange(event_log.key(job))]
    assert len(new_ids) == 2 and not set(new_ids) & set(old_ids), (old_ids, new_ids)
    assert new_ids[-1] == f"{job}:final:2"
    rec = store.get(job)
    assert rec is not None and rec.first_run == 2
    assert not check_token(secret, job, old_link, first_run=rec.first_run)
    assert check_token(secret, job, make_token(secret, job, int(time.time()) + 600, first_run=2), first_run=2)
