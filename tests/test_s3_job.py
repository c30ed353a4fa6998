"""A job whose input is on S3 (a moto server) with an S3 workspace: results land in output/,
nothing is left under temp/."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port, start_worker

pytestmark = pytest.mark.timeout(600)

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
    from ecg_audio.chain import job_payload, send_chain
    from ecg_audio.jobs import JobStore
    from ecg_audio.stack import start_redis

    saved = {k: os.environ.get(k) for k in FAKE_AWS}
    os.environ.update(FAKE_AWS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    port = free_port()
    redis_proc = start_redis(tmp_path / "redis", port, appendonly=False)
    redis_url = f"redis://127.0.0.1:{port}/0"
    worker = None
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
        send_chain(app, job_payload(job_id, "s3://media-in/calls/sample.wav"))
        deadline = time.monotonic() + 400
        rec = store.get(job_id)
        while time.monotonic() < deadline and rec is not None and rec.status not in ("completed", "failed"):
            assert worker.popen.poll() is None, worker.tail()
            time.sleep(1)
            rec = store.get(job_id)
        assert rec is not None and rec.status == "completed", (rec, worker.tail())
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="ecg-work").get("Contents", [])}
        assert {f"output/{job_id}.{ext}" for ext in ("json", "srt", "vtt", "rttm")} <= keys, keys
        assert not [k for k in keys if k.startswith("temp/")], keys
        assert not (tmp_path / "output-local").exists()
    finally:
        if worker is not None:
            worker.stop()
        redis_proc.terminate()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
