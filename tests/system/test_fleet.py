"""The fleet end to end: shim → Redis → chained stages on a real worker → result and callbacks."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook

from tests.conftest import API_KEY, Call, Proc, Receiver, make_media, score, wait_for_worker, wait_job
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ready(api: httpx.Client, worker: Proc) -> httpx.Client:
    wait_for_worker(api, worker)
    return api


def worker_info(stack_env: dict[str, str]) -> dict:
    from celery import Celery

    import celeryconfig

    app = Celery("probe")
    app.config_from_object(celeryconfig)
    app.conf.broker_url = app.conf.result_backend = stack_env["ECG_REDIS_URL"]
    return app.send_task("ecg.worker_info", queue="model").get(timeout=120)


def test_health_and_auth(shim: str, ready: httpx.Client) -> None:
    def health_with_a_worker() -> dict | None:
        h: dict = httpx.get(shim + "/health").json()
        return h if h["workers"] >= 1 else None  # a busy worker may miss one 0.5 s ping

    h = wait_for(health_with_a_worker, 120, interval=1, what="/health counting a worker")
    assert h["broker"] is True and h["workers"] >= 1 and set(h["queue_depth"]) == {"model", "cpu"}
    body = {"job_id": "auth-check", "video_url": "https://example.com/a.mp4"}
    assert httpx.post(shim + "/api/upload-video/process-video", json=body).status_code == 401
    wrong = {"Authorization": "Bearer not-the-key"}
    assert httpx.post(shim + "/api/upload-video/process-video", json=body, headers=wrong).status_code == 403
    assert httpx.get(shim + "/openapi.json").status_code == 200


def test_mp4_with_three_speakers_through_the_shim(
    ready: httpx.Client,
    receiver: Receiver,
    scored_call: Call,
    score_py: Path | None,
    ffmpeg: str,
    tmp_path: Path,
    stack_env: dict[str, str],
    worker: Proc,
) -> None:
    src = scored_call.wav
    mp4 = make_media(
        ffmpeg, src, tmp_path / "conv3.mp4", "-c:a", "aac", "-b:a", "96k", "-shortest", video=True, seconds=200
    )
    with open(mp4, "rb") as fh:
        up = ready.post("/api/uploads", content=fh.read())
    assert up.status_code == 201
    job_id = f"conv3-{uuid.uuid4().hex[:8]}"
    before = worker_info(stack_env)
    r = ready.post(
        "/api/upload-video/process-video",
        json={"job_id": job_id, "video_url": up.json()["video_url"], "callback_url": receiver.url()},
    )
    assert r.status_code == 202 and r.json() == {"job_id": job_id, "status": "queued"}
    st = wait_job(ready, job_id)
    assert st["status"] == "completed", st
    result = st["result"]
    assert result["metadata"]["speakers_detected"] == scored_call.speakers
    # the callback receiver: progress never goes back, exactly one completed payload, all signed
    receiver.wait_status(job_id, "completed")
    events = receiver.for_job(job_id)
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress) and progress[-1] == 100
    assert {10, 25, 40, 60, 85, 100} <= set(progress)
    assert [e["status"] for e in events].count("completed") == 1
    # Standard Webhooks, with this key's own secret
    hook = Webhook(ready.get("/webhooks/secret").json()["secret"])
    mine = [h for h in receiver.headers if json.loads(h["_body"])["job_id"] == job_id]
    assert mine and all(hook.verify(h["_body"].encode(), h)["job_id"] == job_id for h in mine)
    # quality on this file
    out = tmp_path / "result.json"
    out.write_text(json.dumps({"job_id": job_id, "result": result}))
    s = score(score_py, out, scored_call.ref, scored_call.rttm)
    assert s["speakers_hyp"] == scored_call.speakers and s["der"] < scored_call.der_max, s
    # a second job on the same warm worker loads no model
    after = worker_info(stack_env)
    assert after["pid"] == before["pid"] and after["loads"] == before["loads"], (before, after)
    assert all(n == 1 for n in after["loads"].values())
    # librosa's numba code was compiled when the worker started, not in this job's features stage
    events = worker.log_events()
    names = [e.get("event") for e in events]
    assert "features_warmed" in names, worker.tail()
    assert names.index("features_warmed") < names.index("stage_done"), names[:20]
    # exports exist
    out_dir = Path(stack_env["ECG_OUTPUT_ROOT"])
    for ext in ("json", "srt", "vtt", "rttm"):
        assert (out_dir / f"{job_id}.{ext}").stat().st_size > 0


def test_same_job_id_twice_runs_once(ready: httpx.Client, sample_wav: Path, stack_env: dict[str, str]) -> None:
    with open(sample_wav, "rb") as fh:
        url = ready.post("/api/uploads", content=fh.read()).json()["video_url"]
    job_id = f"twice-{uuid.uuid4().hex[:8]}"
    body = {"job_id": job_id, "video_url": url}
    first = ready.post("/api/upload-video/process-video", json=body)
    second = ready.post("/api/upload-video/process-video", json=body)
    assert first.status_code == 202
    assert second.status_code == 200 and second.json()["job_id"] == job_id
    st = wait_job(ready, job_id)
    assert st["status"] == "completed"
    # one run: the chain's first task was sent once (Celery keeps one result per task id)
    import redis

    r = redis.Redis.from_url(stack_env["ECG_REDIS_URL"])
    ingest_results = [k for k in r.scan_iter(f"celery-task-meta-{job_id}:ingest:*")]
    assert len(ingest_results) == 1
    third = ready.post("/api/upload-video/process-video", json=body)
    assert third.json()["status"] == "completed"


def test_bad_media_fails_cleanly_and_worker_stays_up(ready: httpx.Client, tmp_path: Path, receiver: Receiver) -> None:
    up = ready.post("/api/uploads", content=b"\x00\x01garbage" * 1000).json()["video_url"]
    job_id = f"bad-{uuid.uuid4().hex[:8]}"
    ready.post(
        "/api/upload-video/process-video", json={"job_id": job_id, "video_url": up, "callback_url": receiver.url()}
    )
    st = wait_job(ready, job_id, timeout=120)
    assert st["status"] == "failed" and st["error_code"] == "INVALID_MEDIA"
    assert "Traceback" not in (st["error_message"] or "")
    receiver.wait_status(job_id, "failed")
    finals = [e for e in receiver.for_job(job_id) if e["status"] == "failed"]
    assert len(finals) == 1 and finals[0]["error_code"] == "INVALID_MEDIA"
    assert ready.get("/health").json()["workers"] >= 1


def test_language_without_multilingual_model_is_refused_clearly(ready: httpx.Client) -> None:
    r = ready.post(
        "/api/upload-video/process-video",
        json={"job_id": "lang-xx", "video_url": "https://example.com/a.mp4", "language": "xx"},
    )
    assert r.status_code == 422 and "ECG_ASR_MULTILINGUAL_MODEL" in r.text  # German is served now: see test_korean


def test_unknown_job_404(ready: httpx.Client) -> None:
    assert ready.get("/jobs/does-not-exist").status_code == 404
    assert (
        httpx.get(str(ready.base_url) + "/jobs/x", headers={"Authorization": f"Bearer {API_KEY}x"}).status_code == 403
    )


def test_transcribe_waits_for_the_result(ready: httpx.Client, sample_wav: Path) -> None:
    with open(sample_wav, "rb") as fh:
        url = ready.post("/api/uploads", content=fh.read()).json()["video_url"]
    r = ready.post("/transcribe", json={"job_id": f"sync-{uuid.uuid4().hex[:8]}", "video_url": url}, timeout=600)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "completed" and body["progress"] == 100 and body["result"]["segments"]


def test_cancel_and_operator_requeue(
    ready: httpx.Client, worker: Proc, sample_wav: Path, stack_env: dict[str, str]
) -> None:
    import shutil
    import subprocess
    import sys

    # a job whose upload is missing fails in ingest, without retries, with a message
    upload_id = uuid.uuid4().hex
    job_id = f"requeue-{uuid.uuid4().hex[:8]}"
    ready.post("/api/upload-video/process-video", json={"job_id": job_id, "video_url": f"upload://{upload_id}"})
    st = wait_job(ready, job_id, timeout=120)
    assert st["status"] == "failed" and st["error_code"] == "INVALID_MEDIA" and st["stage"] == "ingest"
    cli = [str(Path(sys.executable).parent / "celery"), "-A", "worker.app", "jobs"]
    listed = subprocess.run([*cli, "list", "--failed"], env=stack_env, capture_output=True, text=True, timeout=60)
    assert job_id in listed.stdout, listed.stderr[-2000:]
    # the operator puts the file in place and requeues: the job completes
    uploads = Path(stack_env["ECG_VAR_DIR"]) / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    shutil.copy(sample_wav, uploads / upload_id)
    out = subprocess.run([*cli, "requeue", job_id], env=stack_env, capture_output=True, text=True, timeout=60)
    assert "requeued" in out.stdout, out.stderr[-2000:]
    assert wait_job(ready, job_id)["status"] == "completed"
    # DELETE cancels a queued job; its chain stops at the next stage boundary
    cancel_id = f"cancel-{uuid.uuid4().hex[:8]}"
    with open(sample_wav, "rb") as fh:
        url = ready.post("/api/uploads", content=fh.read()).json()["video_url"]
    ready.post("/api/upload-video/process-video", json={"job_id": cancel_id, "video_url": url})
    d = ready.delete(f"/jobs/{cancel_id}")
    assert d.status_code == 200
    st = d.json()
    if st["status"] != "completed":  # unless it won the race and finished first
        assert st["status"] == "failed" and st["error_code"] == "CANCELLED"

        def chain_stopped() -> bool:  # the worker met the cancelled job and stopped its chain
            return any(
                e.get("job_id") == cancel_id and e.get("event") in ("chain_stopped", "stage_cancelled")
                for e in worker.log_events()
            )

        wait_for(chain_stopped, 300, interval=0.5, what=f"the worker stopping {cancel_id}'s chain")
        assert ready.get(f"/jobs/{cancel_id}").json()["error_code"] == "CANCELLED"


def test_cancel_stops_the_running_stage(
    ready: httpx.Client, stack_env: dict[str, str], worker: Proc, sample_wav: Path, ffmpeg: str, tmp_path: Path
) -> None:
    """DELETE during transcription stops that stage at its next progress report, not after it."""
    import redis

    # the sample four times over: 2 minutes, several seconds of transcription on 2 cores
    src = make_media(ffmpeg, None, tmp_path / "long.wav", "-stream_loop", "3", "-i", str(sample_wav))
    with open(src, "rb") as fh:
        url = ready.post("/api/uploads", content=fh.read()).json()["video_url"]
    job_id = f"cancel-running-{uuid.uuid4().hex[:8]}"
    assert ready.post("/api/upload-video/process-video", json={"job_id": job_id, "video_url": url}).status_code == 202
    def transcribing() -> bool:
        st = ready.get(f"/jobs/{job_id}").json()
        assert st["status"] not in ("completed", "failed"), st
        return bool(st["stage"] == "transcribe")

    wait_for(transcribing, 300, interval=0.1, what=f"{job_id} in its transcribe stage")
    assert ready.delete(f"/jobs/{job_id}").json()["error_code"] == "CANCELLED"
    # the worker is free again: the next job completes
    with open(sample_wav, "rb") as fh:
        next_url = ready.post("/api/uploads", content=fh.read()).json()["video_url"]
    next_id = f"after-cancel-{uuid.uuid4().hex[:8]}"
    ready.post("/api/upload-video/process-video", json={"job_id": next_id, "video_url": next_url})
    assert wait_job(ready, next_id)["status"] == "completed"
    # the cancelled job's transcription never finished, and nothing after it ran
    r = redis.Redis.from_url(stack_env["ECG_REDIS_URL"], decode_responses=True)
    runs = {k: v for k, v in r.hgetall(f"ecg:job:{job_id}").items() if k.startswith("runs:")}
    assert set(runs) == {"runs:ingest", "runs:diarize"}, runs
    stopped = [e for e in worker.log_events() if e.get("event") == "stage_cancelled" and e.get("job_id") == job_id]
    assert [e.get("stage") for e in stopped] == ["transcribe"], stopped
    final = ready.get(f"/jobs/{job_id}").json()
    assert final["status"] == "failed" and final["error_code"] == "CANCELLED"
