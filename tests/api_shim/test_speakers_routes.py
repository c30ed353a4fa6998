"""The speaker library's routes against a real Redis (no worker: enrollment from a job's voices).

* Tenancy: another key can't list, read, rename, use (``options.speakers``, ``from_job``) or
  delete a key's speakers: 404 / 422, as for jobs.
* Erasure: after ``DELETE /speakers/{id}`` no Redis key holds the speaker's id or voiceprint.
* Bad requests answer problem+json with a clear code.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

PROCESS = "/api/upload-video/process-video"
KEY_A = "speakers-a-key-0123456789"
KEY_B = "speakers-b-key-9876543210"


def _db(redis_url: str) -> str:
    """Database 6: no worker listens there (accepted jobs only wait)."""
    return redis_url.rsplit("/", 1)[0] + "/6"


@pytest.fixture
def clients(redis_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, TestClient]]:
    from api_shim.app import create_app
    from ecg_audio.settings import Settings

    settings = Settings(
        api_keys=[KEY_A, KEY_B], redis_url=_db(redis_url), workspace_root=tmp_path / "ws", output_root=tmp_path / "o"
    )
    app = create_app(settings)
    yield (
        TestClient(app, headers={"Authorization": f"Bearer {KEY_A}"}),
        TestClient(app, headers={"Authorization": f"Bearer {KEY_B}"}),
    )


def _fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).digest()[:16].hex()


def _voice(seed: int) -> list[float]:
    import numpy as np

    v = np.random.default_rng(seed).normal(size=192)
    return [round(float(x), 5) for x in v / np.linalg.norm(v)]


def _finished_job(client: TestClient, redis_url: str, voices: dict[str, list[float]]) -> str:
    """A job of the client's key, completed, with its speakers' voices kept (as merge keeps them)."""
    from ecg_audio.jobs import JobStore
    from ecg_audio.speakers import SpeakerLibrary

    job_id = f"spk-{uuid.uuid4().hex[:10]}"
    assert client.post(PROCESS, json={"job_id": job_id, "video_url": "upload://" + uuid.uuid4().hex}).status_code == 202
    store = JobStore.from_url(_db(redis_url))
    assert store.update(job_id, status="completed", progress=100)
    owner = store.get(job_id).owner  # type: ignore[union-attr]
    SpeakerLibrary(store.r).keep_job_voices(job_id, owner, voices, 3600)
    return job_id


def _redis_holds(redis_url: str, needles: list[str]) -> list[str]:
    """Keys of the whole database whose name or any value contains one of ``needles``."""
    r = redis.Redis.from_url(_db(redis_url), decode_responses=True)
    found = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        if kind == "string":
            values = [r.get(key) or ""]
        elif kind == "hash":
            values = [f"{k}={v}" for k, v in r.hgetall(key).items()]
        elif kind in ("set", "zset", "list"):
            values = [
                str(x)
                for x in (
                    r.smembers(key)
                    if kind == "set"
                    else r.zrange(key, 0, -1)
                    if kind == "zset"
                    else r.lrange(key, 0, -1)
                )
            ]
        else:
            values = []
        if any(n in key or any(n in v for v in values) for n in needles):
            found.append(key)
    return found


def test_enroll_from_a_job_then_tenancy_and_erasure(clients: tuple[TestClient, TestClient], redis_url: str) -> None:
    a, b = clients
    voice = _voice(1)
    job_id = _finished_job(a, redis_url, {"SPEAKER_00": voice, "SPEAKER_01": _voice(2)})

    # another key can't enroll from A's job: the job is not theirs
    r = b.post("/speakers", json={"name": "Kim", "from_job": job_id, "speaker": "SPEAKER_00"})
    assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND", r.text
    r = a.post("/speakers", json={"name": "Kim", "from_job": job_id, "speaker": "SPEAKER_07"})
    assert r.status_code == 404 and r.json()["code"] == "SPEAKER_NOT_IN_JOB", r.text
    r = a.post("/speakers", json={"name": "Kim", "from_job": job_id, "speaker": "SPEAKER_00"})
    assert r.status_code == 201, r.text
    speaker = r.json()
    sid = speaker["id"]
    assert speaker["name"] == "Kim" and speaker["samples"][0]["source"] == f"job:{job_id}:SPEAKER_00"
    assert "vector" not in json.dumps(speaker), "the API never shows a voiceprint"

    assert [s["id"] for s in a.get("/speakers").json()["speakers"]] == [sid]
    assert b.get("/speakers").json()["speakers"] == []
    for method, body in (("GET", None), ("PATCH", {"name": "stolen"}), ("DELETE", None)):
        r = b.request(method, f"/speakers/{sid}", json=body)
        assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND", (method, r.text)
    # B can't use A's voice in a job either
    r = b.post(
        PROCESS,
        json={
            "job_id": f"use-{uuid.uuid4().hex[:8]}",
            "video_url": "upload://" + "0" * 32,
            "options": {"speakers": [sid]},
        },
    )
    assert r.status_code == 422 and r.json()["code"] == "UNKNOWN_SPEAKER", r.text
    ok = a.post(
        PROCESS,
        json={
            "job_id": f"use-{uuid.uuid4().hex[:8]}",
            "video_url": "upload://" + "0" * 32,
            "options": {"speakers": [sid], "identify_speakers": True},
        },
    )
    assert ok.status_code == 202, ok.text

    # rename, and a second sample from the job's other speaker: the voiceprint is their mean
    r = a.patch(f"/speakers/{sid}", json={"name": "김민지", "from_job": job_id, "speaker": "SPEAKER_01"})
    assert r.status_code == 200 and r.json()["name"] == "김민지" and len(r.json()["samples"]) == 2, r.text
    assert a.get(f"/speakers/{sid}").json()["name"] == "김민지"
    assert a.get("/speakers/" + "f" * 32).status_code == 404
    assert a.get("/speakers/not-an-id").status_code == 422

    from ecg_audio.speakers import SpeakerLibrary

    stored = SpeakerLibrary(redis.Redis.from_url(_db(redis_url), decode_responses=True)).get(_fingerprint(KEY_A), sid)
    assert stored is not None
    # the voiceprint, as the library writes it (json) and as numbers anywhere
    prints = [json.dumps(stored.vector[:3])[1:-1], json.dumps(stored.samples[1]["vector"][:3])[1:-1]]
    assert _redis_holds(redis_url, prints[:1])  # the scan finds what is there

    assert a.delete(f"/speakers/{sid}").status_code == 204
    assert a.get(f"/speakers/{sid}").status_code == 404
    assert a.delete(f"/speakers/{sid}").status_code == 404
    assert _redis_holds(redis_url, prints[:1]) == [], "the voiceprint outlived its DELETE"
    # what is left of the sample's voice is the job's own (kept as long as the job, README)
    assert all(k.startswith("ecg:job-voices:") for k in _redis_holds(redis_url, prints[1:]))
    # the id is left only where a job named it as a candidate (a reference, no voice)
    assert all(k.startswith("ecg:job:use-") for k in _redis_holds(redis_url, [sid]))


def test_bad_enrollments_answer_clear_codes(clients: tuple[TestClient, TestClient], redis_url: str) -> None:
    a, _ = clients
    r = a.post("/speakers", json={"from_job": "x", "speaker": "SPEAKER_00"})
    assert r.status_code == 422 and r.json()["code"] == "VALIDATION_ERROR" and "name" in r.text
    r = a.post("/speakers", json={"name": "Kim"})
    assert r.status_code == 422 and "from_job" in r.json()["detail"]
    r = a.post("/speakers", json={"name": "Kim", "from_job": "no-such-job", "speaker": "SPEAKER_00"})
    assert r.status_code == 404
    r = a.post("/speakers", json={"name": "", "from_job": "j", "speaker": "SPEAKER_00"})
    assert r.status_code == 422
    r = a.post("/speakers", content=b"{" * 70_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    big = b"x" * 10
    r = a.post(
        "/speakers", files={"file": ("a.wav", big)}, data={"name": "Kim"}, headers={"Content-Length": str(60 * 1024**2)}
    )
    assert r.status_code in (400, 413), r.text


def test_a_sample_no_worker_took_is_pending_and_delete_cancels_it(redis_url: str, tmp_path: Path) -> None:
    """No worker consumes this database: the enrollment answers 202 (enrolling) after the wait; a
    DELETE cancels it, deletes the stored sample, and a worker that comes later finds nothing to do."""
    from api_shim.app import create_app
    from ecg_audio.settings import Settings
    from ecg_audio.speakers import PENDING_KEY, SpeakerLibrary

    settings = Settings(
        api_keys=[KEY_A, KEY_B],
        redis_url=_db(redis_url),
        workspace_root=tmp_path / "ws",
        output_root=tmp_path / "o",
        speaker_enroll_wait_s=0.3,
    )
    a = TestClient(create_app(settings), headers={"Authorization": f"Bearer {KEY_A}"})
    b = TestClient(create_app(settings), headers={"Authorization": f"Bearer {KEY_B}"})
    sample = b"RIFF-not-really-audio" * 200
    r = a.post("/speakers", data={"name": "Kim"}, files={"file": ("kim.wav", sample)})
    assert r.status_code == 202 and r.json()["status"] == "enrolling", r.text
    sid = r.json()["id"]
    assert r.headers["location"] == f"/speakers/{sid}"
    assert a.get(f"/speakers/{sid}").json()["code"] == "SPEAKER_ENROLLING"
    uploads = tmp_path / "uploads"
    assert [p for p in uploads.iterdir() if p.read_bytes() == sample], "the sample waits as an upload"
    assert b.delete(f"/speakers/{sid}").status_code == 404  # not B's to cancel
    assert a.delete(f"/speakers/{sid}").status_code == 204
    assert not [p for p in uploads.iterdir() if p.read_bytes() == sample], "DELETE left the sample"
    r6 = redis.Redis.from_url(_db(redis_url))
    assert not r6.exists(PENDING_KEY + sid)
    assert SpeakerLibrary(r6).take_pending(sid) is False  # the late worker's claim fails
    assert a.get(f"/speakers/{sid}").json()["code"] == "NOT_FOUND"
