"""The job list, queue positions, ETAs and result routes, in-process against a real Redis.

These apps use Redis database 3, where no worker listens: accepted jobs stay queued, so the
queue is what the test makes it. The end-to-end variant (a real job's result and exports,
parsed by real parsers) is in tests/system/test_openai_api.py, which runs a worker anyway.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

PROCESS = "/api/upload-video/process-video"
KEY_A = "results-key-a-0123456789"
KEY_B = "results-key-b-0123456789"


@pytest.fixture
def db3(redis_url: str) -> Iterator[str]:
    url = redis_url.rsplit("/", 1)[0] + "/3"
    redis.Redis.from_url(url).flushdb()
    yield url
    redis.Redis.from_url(url).flushdb()


def _app(url: str, tmp_path: Path) -> Any:
    from api_shim.app import create_app
    from ecg_audio.settings import Settings

    return create_app(
        Settings(api_keys=[KEY_A, KEY_B], redis_url=url, workspace_root=tmp_path / "ws", output_root=tmp_path / "out")
    )


def _clients(url: str, tmp_path: Path) -> tuple[TestClient, TestClient]:
    app = _app(url, tmp_path)
    return (
        TestClient(app, headers={"Authorization": f"Bearer {KEY_A}"}),
        TestClient(app, headers={"Authorization": f"Bearer {KEY_B}"}),
    )


def _submit(client: TestClient, job_id: str) -> None:
    r = client.post(PROCESS, json={"job_id": job_id, "video_url": "upload://" + uuid.uuid4().hex})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/jobs/{job_id}"


def test_the_job_list_pages_250_jobs_newest_first_without_gaps_or_repeats(db3: str, tmp_path: Path) -> None:
    a, b = _clients(db3, tmp_path)
    mine = [f"list-a-{n:03d}" for n in range(250)]
    for n, job_id in enumerate(mine):
        _submit(a, job_id)
        if n % 10 == 0:
            _submit(b, f"list-b-{n:03d}")  # another key's jobs, interleaved: never listed for A
    for job_id in mine[::25]:
        assert a.delete(f"/jobs/{job_id}").status_code == 200  # cancelled: failed/CANCELLED
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 7}
        if cursor:
            params["cursor"] = cursor
        page = a.get("/jobs", params=params)
        assert page.status_code == 200, page.text
        seen += [j["job_id"] for j in page.json()["jobs"]]
        cursor = page.json()["next_cursor"]
        pages += 1
        if cursor is None:
            break
    assert seen == list(reversed(mine)), "pages skipped, repeated or reordered jobs"
    assert pages >= 250 // 7
    failed = a.get("/jobs", params={"status": "failed", "limit": 200}).json()
    assert [j["job_id"] for j in failed["jobs"]] == list(reversed(mine[::25]))
    assert all(j["status"] == "failed" for j in failed["jobs"])
    theirs = b.get("/jobs", params={"limit": 200}).json()["jobs"]
    assert len(theirs) == 25 and all(j["job_id"].startswith("list-b-") for j in theirs)
    bad = a.get("/jobs", params={"cursor": "not-a-cursor!"})
    assert bad.status_code == 422 and bad.json()["code"] == "INVALID_CURSOR", bad.text


def test_queue_position_counts_the_jobs_ahead(db3: str, tmp_path: Path) -> None:
    a, _ = _clients(db3, tmp_path)
    ids = [f"queue-{n}" for n in range(5)]
    for job_id in ids:
        _submit(a, job_id)
    positions = [a.get(f"/jobs/{job_id}").json()["queue_position"] for job_id in ids]
    assert positions == [0, 1, 2, 3, 4]
    # the consumer takes the oldest message (what a worker's BRPOP does): everyone moves up
    redis.Redis.from_url(db3).rpop("cpu")
    assert a.get(f"/jobs/{ids[4]}").json()["queue_position"] == 3


def test_eta_comes_from_measured_stage_speeds_and_the_audio_duration(db3: str, tmp_path: Path) -> None:
    from ecg_audio.chain import STAGES
    from ecg_audio.jobs import JobStore

    a, _ = _clients(db3, tmp_path)
    store = JobStore(redis.Redis.from_url(db3, decode_responses=True))
    # two finished jobs, as a worker leaves them: each stage took 0.1 s per second of audio
    for n in range(2):
        done = f"eta-done-{n}"
        store.create(done, {"video_url": "s3://b/k"})
        store.set_result(
            done, {"result": {"metadata": {"duration": 100.0, "stage_times": dict.fromkeys(STAGES, 10.0)}}}
        )
        store.update(done, status="completed", progress=100, stage="merge")
    _submit(a, "eta-running")
    assert a.get("/jobs/eta-running").json()["eta_s"] is None, "no duration yet: no estimate"
    # ingest done on 50 s of audio, the diarize stage half way (progress 25 of 10..40)
    store.update("eta-running", status="processing", progress=25, stage="diarize", duration=50.0)
    eta = a.get("/jobs/eta-running").json()["eta_s"]
    assert eta == pytest.approx(0.1 * 50 * (0.5 + 4), abs=0.1), eta  # half of diarize, then 4 stages


def test_result_and_exports_are_404_until_completed_with_a_clear_message(db3: str, tmp_path: Path) -> None:
    a, b = _clients(db3, tmp_path)
    _submit(a, "not-yet")
    for path in ("/jobs/not-yet/result", "/jobs/not-yet/exports/srt"):
        r = a.get(path)
        assert r.status_code == 404 and r.json()["code"] == "RESULT_NOT_READY", r.text
        assert "no result yet: it is queued" in r.json()["detail"]
        assert r.headers["content-type"].startswith("application/problem+json")
        assert b.get(path).json()["code"] == "NOT_FOUND", "another key learns nothing"
    assert a.get("/jobs/not-yet/exports/docx").status_code == 422
