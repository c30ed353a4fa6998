"""The shim's isolation and health rules, against a real Redis (no worker needed).

* A job belongs to the API key that created it: another key gets 404 on every job route.
* Re-POSTing a job_id with another body is a 409 that names the differing fields; the same
  body is idempotent (200, the job's state).
* ``/health`` does not broadcast a Celery ping per call (counted on the broadcast channel);
  ``/health/live`` always answers, ``/health/ready`` answers 503 when the broker is down.
* A DNS failure that may be temporary answers 503 with Retry-After, not a final 422.

The apps run in-process (``TestClient`` without its lifespan: no callback dispatcher is
needed); they use databases where no worker listens, and random job ids.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from tests.conftest import free_port

PROCESS = "/api/upload-video/process-video"
KEY_A = "tenant-a-key-0123456789"
KEY_B = "tenant-b-key-9876543210"


def _settings(redis_url: str, tmp_path: Path, **extra: Any) -> Any:
    from ecg_audio.settings import Settings

    return Settings(
        api_keys=[KEY_A, KEY_B],
        redis_url=redis_url,
        workspace_root=tmp_path / "ws",
        output_root=tmp_path / "out",
        **extra,
    )


@pytest.fixture
def clients(redis_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, TestClient]]:
    from api_shim.app import create_app

    app = create_app(_settings(_db5(redis_url), tmp_path))
    yield (
        TestClient(app, headers={"Authorization": f"Bearer {KEY_A}"}),
        TestClient(app, headers={"Authorization": f"Bearer {KEY_B}"}),
    )


def _db5(redis_url: str) -> str:
    """Database 5: no worker listens there, so accepted jobs only wait (and load no one)."""
    return redis_url.rsplit("/", 1)[0] + "/5"


def _body(job_id: str, **extra: Any) -> dict[str, Any]:
    return {"job_id": job_id, "video_url": "upload://" + uuid.uuid4().hex, **extra}


def test_a_job_is_invisible_to_another_key(clients: tuple[TestClient, TestClient], redis_url: str) -> None:
    a, b = clients
    job_id = f"tenant-{uuid.uuid4().hex[:10]}"
    assert a.post(PROCESS, json=_body(job_id)).status_code == 202
    assert a.get(f"/jobs/{job_id}").status_code == 200
    for method in ("GET", "DELETE"):
        r = b.request(method, f"/jobs/{job_id}")
        assert r.status_code == 404 and "no such job" in r.text, (method, r.text)
    assert a.get(f"/jobs/{job_id}").json()["status"] == "queued", "B's DELETE reached A's job"
    # the record holds a fingerprint of the key, never the key
    record = redis.Redis.from_url(_db5(redis_url)).hgetall(f"ecg:job:{job_id}")
    assert KEY_A.encode() not in b"".join(k + v for k, v in record.items())
    assert len(record[b"owner"]) == 32


def test_a_conflicting_repost_is_409_and_the_same_body_is_idempotent(clients: tuple[TestClient, TestClient]) -> None:
    a, b = clients
    job_id = f"repost-{uuid.uuid4().hex[:10]}"
    body = _body(job_id, options={"num_speakers": 2})
    assert a.post(PROCESS, json=body).status_code == 202
    same = a.post(PROCESS, json=body)
    assert same.status_code == 200 and same.json()["job_id"] == job_id and same.json()["status"] == "queued"
    other = a.post(PROCESS, json={**body, "options": {"num_speakers": 3}, "language": "en"})
    assert other.status_code == 409, other.text
    detail = other.json()["detail"]
    assert job_id in detail and "language" in detail and "options" in detail and "video_url" not in detail, detail
    assert "progress" not in other.json(), "a conflict must not show the other job's state"
    # another key posting the same body gets a conflict too, never the job's state
    theirs = b.post(PROCESS, json=body)
    assert theirs.status_code == 409 and "progress" not in theirs.json(), theirs.text


def test_health_pings_the_workers_at_most_once_per_interval(redis_url: str, tmp_path: Path) -> None:
    """50 concurrent /health calls cost at most one Celery ping broadcast.

    The broadcasts are counted where they go: kombu publishes them on the channel
    ``/{db}.celery.pidbox``; this app uses database 4, which nothing else in the session pings.
    """
    from api_shim.app import create_app

    db4 = redis_url.rsplit("/", 1)[0] + "/4"
    client = TestClient(create_app(_settings(db4, tmp_path)))
    listener = redis.Redis.from_url(db4).pubsub()
    listener.subscribe("/4.celery.pidbox")
    assert listener.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    answers: list[int] = []

    def call() -> None:
        answers.append(client.get("/health").status_code)

    # daemon threads: concurrent Celery pings from one process can wedge kombu, and a wedged
    # thread must fail this test, not hang the run
    threads = [threading.Thread(target=call, daemon=True) for _ in range(50)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    assert answers == [200] * 50, f"{len(answers)} of 50 answered"
    pings = 0
    while listener.get_message(timeout=1.0) is not None:
        pings += 1
    listener.close()
    assert pings == 1, pings  # unpatched, every call broadcast its own ping


def test_liveness_and_readiness(redis_url: str, tmp_path: Path) -> None:
    from api_shim.app import create_app

    up = TestClient(create_app(_settings(redis_url, tmp_path)))
    assert up.get("/health/live").status_code == 200
    assert up.get("/health/ready").status_code == 200
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    down = TestClient(create_app(_settings(dead_broker, tmp_path)))
    assert down.get("/health/live").status_code == 200
    ready = down.get("/health/ready")
    assert ready.status_code == 503 and "broker" in ready.text, ready.text


def test_a_temporary_dns_failure_is_503_with_retry_after(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EAI_AGAIN may pass: 503 + Retry-After (a backend treats 4xx as final); NXDOMAIN stays 422."""
    from api_shim import dns
    from api_shim.app import create_app

    def resolver(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        if host.startswith("flaky"):
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(dns.socket, "getaddrinfo", resolver)
    client = TestClient(create_app(_settings(_db5(redis_url), tmp_path)), headers={"Authorization": f"Bearer {KEY_A}"})
    flaky = client.post(PROCESS, json=_body(f"dns-{uuid.uuid4().hex[:8]}", video_url="https://flaky.example/a.mp4"))
    assert flaky.status_code == 503, flaky.text
    assert int(flaky.headers["retry-after"]) > 0 and "did not resolve" in flaky.json()["detail"]
    gone = client.post(PROCESS, json=_body(f"dns-{uuid.uuid4().hex[:8]}", video_url="https://gone.example/a.mp4"))
    assert gone.status_code == 422 and "did not resolve" in gone.json()["detail"], gone.text
