"""Per-key limits (api_shim/limits.py) shared by two real shim processes on one Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[2]
RATE, CAP = 5, 3


@pytest.fixture
def two_shims(scratch_redis_url: str, redis_client: object, tmp_path: Path) -> Iterator[tuple[str, str]]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "ECG_REDIS_URL": scratch_redis_url,
        "ECG_API_KEYS": '["key-one", "key-two"]',
        "ECG_SUBMIT_RATE_PER_KEY": str(RATE),
        "ECG_SUBMIT_RATE_WINDOW_S": "60",
        "ECG_QUEUED_JOBS_PER_KEY": str(CAP),
        "ECG_QUEUE_RETRY_AFTER_S": "30",
        "ECG_URL_ALLOWLIST": '["127.0.0.1"]',
        "ECG_VAR_DIR": str(tmp_path),
        "ECG_LOG_LEVEL": "WARNING",
    }
    processes, urls = [], []
    for name in ("a", "b"):
        port = free_port()
        log = open(tmp_path / f"shim-{name}.log", "wb")  # noqa: SIM115
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "api_shim.app:app", "--host", "127.0.0.1", "--port", str(port)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for process, url in zip(processes, urls, strict=True):

            def up(process: subprocess.Popen[bytes] = process, url: str = url) -> bool:
                assert process.poll() is None, (tmp_path / "shim-a.log").read_text()[-2000:]
                try:
                    httpx.get(url + "/health", timeout=2)
                except httpx.HTTPError:
                    return False
                return True

            wait_for(up, 120, interval=0.3, what=f"shim {url} to start")
        yield urls[0], urls[1]
    finally:
        for process in processes:
            process.terminate()
            process.wait(20)


def _submit(url: str, job_id: str, key: str = "key-one") -> httpx.Response:
    return httpx.post(
        url + "/api/upload-video/process-video",
        json={"job_id": job_id, "video_url": "http://127.0.0.1:9/talk.wav"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def test_rate_and_queue_cap_are_shared_by_two_shims(two_shims: tuple[str, str], redis_client) -> None:
    a, b = two_shims
    assert [_submit(u, j).status_code for u, j in ((a, "j1"), (b, "j2"), (a, "j3"))] == [202, 202, 202]

    capped = _submit(b, "j4")  # a fourth unfinished job, on the other shim
    assert capped.status_code == 429, capped.text
    assert capped.headers["Retry-After"] == "30"
    assert _submit(a, "j2").status_code == 200  # a re-POST of a queued job is not a new job

    redis_client.hset("ecg:job:j1", "status", "completed")  # a worker finished one
    assert _submit(b, "j4").status_code == 202

    redis_client.hset("ecg:job:j2", "status", "failed")
    redis_client.hset("ecg:job:j3", "status", "completed")
    # the re-POST above was not a submission: j5 is the key's 5th within the minute, j6 its 6th
    assert _submit(a, "j5").status_code == 202
    limited = _submit(a, "j6")  # room in the queue, but past the rate
    assert limited.status_code == 429, limited.text
    assert 1 <= int(limited.headers["Retry-After"]) <= 60

    assert _submit(b, "other-1", key="key-two").status_code == 202  # limits are per key
