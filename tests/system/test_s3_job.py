"""A job whose input is on S3 (a moto server) with an S3 workspace: results land in output/,
nothing is left under temp/."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEY, Proc, free_port, start_worker
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def test_s3_input_workspace_and_output(tmp_path: Path, sample_wav: Path) -> None:
    import boto3
    from celery import Celery
    from moto.server import ThreadedMotoServer

    import celeryconfig
    from ecg_audio.chain import send_chain
    from ecg_audio.jobs import JobStore
    from ops.stack import start_redis

    saved = {k: os.environ.get(k) for k in FAKE_AWS}
    os.environ.update(FAKE_AWS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    port = free_port()
    redis_proc = start_redis(tmp_path / "redis", port, appendonly=False)
    redis_url = f"redis://127.0.0.1:{port}/0"
    worker = shim = None
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="media-in")
        s3.create_bucket(Bucket="ecg-work")
        s3.upload_file(str(sample_wav), "media-in", "calls/sample.wav")
        env = dict(os.environ)
        env.update(FAKE_AWS)
        env.update(
            {
                "ECG_REDIS_URL": redis_url,
                "ECG_WORKSPACE_ROOT": str(tmp_path / "cache"),
                "ECG_OUTPUT_ROOT": str(tmp_path / "output-local"),
                "ECG_WORKSPACE_BACKEND": "s3",
                "ECG_S3_BUCKET": "ecg-work",
                "ECG_S3_INPUT_PREFIXES": '["media-in/calls/"]',
                "ECG_AWS_ENDPOINT_URL": endpoint,
                "ECG_AWS_REGION": "us-east-1",
            }
        )
        worker = start_worker(env, tmp_path / "worker.log", name="s3w")
        app = Celery("s3test")
        app.config_from_object(celeryconfig)
        app.conf.broker_url = app.conf.result_backend = redis_url
        store = JobStore.from_url(redis_url)
        job_id = f"s3-{uuid.uuid4().hex[:8]}"
        store.create(job_id, {"video_url": "s3://media-in/calls/sample.wav"})
        send_chain(app, {"job_id": job_id})
        wait_for(lambda: _over(store, job_id, worker), 400, interval=1, what=lambda: worker.tail())
        rec = store.get(job_id)
        assert rec is not None and rec.status == "completed", (rec, worker.tail())
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="ecg-work").get("Contents", [])}
        assert {f"output/{job_id}.{ext}" for ext in ("json", "srt", "vtt", "rttm")} <= keys, keys
        assert not [k for k in keys if k.startswith("temp/")], keys
        assert not (tmp_path / "output-local").exists()

        # an upload through the shim goes to s3://ecg-work/uploads/<id>, where a worker on any
        # machine finds it; nothing stays on the shim's disk
        shim_port = free_port()
        shim_env = {**env, "ECG_API_KEYS": f'["{API_KEY}"]'}
        shim = Proc("shim", [sys.executable, "-m", "uvicorn", "api_shim.app:app", "--port", str(shim_port)],
                    shim_env, tmp_path / "shim.log")
        api = httpx.Client(base_url=f"http://127.0.0.1:{shim_port}", headers={"Authorization": f"Bearer {API_KEY}"})
        wait_for(lambda: shim.answers(f"http://127.0.0.1:{shim_port}/health"), 120, interval=0.3, what=shim.tail)
        up = api.post("/api/uploads", content=sample_wav.read_bytes(), timeout=30)
        assert up.status_code == 201, up.text
        uid = up.json()["video_url"].removeprefix("upload://")
        head = s3.head_object(Bucket="ecg-work", Key=f"uploads/{uid}")
        assert head["ContentLength"] == sample_wav.stat().st_size
        local = tmp_path / "uploads"
        assert not local.exists() or not any(local.iterdir()), list(local.iterdir())
        finals = {}
        for kind, url in (("uploaded", f"upload://{uid}"), ("missing", "upload://" + "0" * 32)):
            jid = f"s3-{kind}-{uuid.uuid4().hex[:8]}"
            r = api.post("/api/upload-video/process-video", json={"job_id": jid, "video_url": url})
            assert r.status_code == 202, r.text
            wait_for(lambda jid=jid: _over(store, jid, worker), 300, interval=0.5, what=worker.tail)
            finals[kind] = store.get(jid)
        assert finals["uploaded"] is not None and finals["uploaded"].status == "completed", worker.tail()
        gone = finals["missing"]
        assert gone is not None and gone.status == "failed" and gone.error_code == "INVALID_MEDIA", gone
        assert "the uploaded file is gone" in (gone.error_message or ""), gone
        assert worker.popen.poll() is None
    finally:
        if shim is not None:
            shim.stop()
        if worker is not None:
            worker.stop()
        redis_proc.terminate()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _over(store: Any, job_id: str, worker: Proc) -> bool:
    """Whether the job has ended (or has no record); the worker must still run meanwhile."""
    worker.check_alive()
    rec = store.get(job_id)
    return rec is None or rec.status in ("completed", "failed")
