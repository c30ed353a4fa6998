"""The webhook routes against a real Redis, the app in-process (no worker, no dispatcher):

* ``GET /webhooks/secret``: a ``whsec_`` secret per API key, stable, different between keys;
* ``POST /webhooks/secret/rotate``: a new secret, the previous one signing until the overlap ends;
* ``POST /jobs/{id}/callbacks/replay``: only the owner's key; dead letters go back to the outbox,
  in order, with their ids; ``since`` picks those after an event of the job's log;
* without a root key, the secret routes say so (503) instead of handing out something unusable.
"""

from __future__ import annotations

import base64
import datetime
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from ecg_audio import callbacks
from ecg_audio.callbacks import CallbackOutbox

KEY_A = "tenant-a-key-0123456789"
KEY_B = "tenant-b-key-9876543210"
ROOT = "webhook-root-key-for-tests-0123"


def _app(redis_url: str, tmp_path: Path, **extra: Any) -> Any:
    from api_shim.app import create_app
    from ecg_audio.settings import Settings

    db = redis_url.rsplit("/", 1)[0] + "/6"  # no worker listens there
    return create_app(
        Settings(
            api_keys=[KEY_A, KEY_B],
            redis_url=db,
            workspace_root=tmp_path / "ws",
            output_root=tmp_path / "out",
            url_allowlist=["127.0.0.1"],
            **extra,
        )
    )


@pytest.fixture
def clients(redis_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, TestClient]]:
    app = _app(redis_url, tmp_path, callback_signing_key=ROOT)
    yield (
        TestClient(app, headers={"Authorization": f"Bearer {KEY_A}"}),
        TestClient(app, headers={"Authorization": f"Bearer {KEY_B}"}),
    )


def test_each_key_has_its_own_stable_secret(clients: tuple[TestClient, TestClient]) -> None:
    a, b = clients
    sa, sb = a.get("/webhooks/secret"), b.get("/webhooks/secret")
    assert sa.status_code == 200 and sb.status_code == 200
    secret = sa.json()["secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert secret != sb.json()["secret"]
    assert a.get("/webhooks/secret").json()["secret"] == secret
    assert TestClient(a.app).get("/webhooks/secret").status_code == 401  # no key, no secret


def test_rotate_gives_a_new_secret_and_an_overlap(clients: tuple[TestClient, TestClient]) -> None:
    a, b = clients
    before_b = b.get("/webhooks/secret").json()["secret"]
    old = a.get("/webhooks/secret").json()["secret"]
    r = a.post("/webhooks/secret/rotate")
    assert r.status_code == 200, r.text
    new = r.json()["secret"]
    assert new != old and a.get("/webhooks/secret").json()["secret"] == new
    until = datetime.datetime.fromisoformat(r.json()["previous_valid_until"]).timestamp()
    assert abs(until - (time.time() + 24 * 3600)) < 120  # the default overlap: 24 h
    r2 = a.post("/webhooks/secret/rotate", json={"overlap_s": 60})
    assert abs(datetime.datetime.fromisoformat(r2.json()["previous_valid_until"]).timestamp() - time.time() - 60) < 30
    assert b.get("/webhooks/secret").json()["secret"] == before_b  # another key's is untouched


def test_without_a_root_key_the_secret_routes_say_so(redis_url: str, tmp_path: Path) -> None:
    c = TestClient(_app(redis_url, tmp_path), headers={"Authorization": f"Bearer {KEY_A}"})
    r = c.get("/webhooks/secret")
    assert r.status_code == 503 and r.json()["code"] == "WEBHOOKS_NOT_CONFIGURED"


def _job_with_dead_letters(a: TestClient, n: int) -> tuple[str, list[str], redis.Redis]:
    job_id = f"wh-{uuid.uuid4().hex[:8]}"
    req = {"job_id": job_id, "video_url": "http://127.0.0.1:9/a.wav", "callback_url": "http://127.0.0.1:9/cb"}
    assert a.post("/api/upload-video/process-video", json=req).status_code == 202
    shim = a.app.state.shim  # type: ignore[attr-defined]
    r = redis.Redis.from_url(shim.settings.redis_url)
    ids = []
    for p in range(n):
        assert shim.store.events.progress(job_id, progress=10 + p, stage="ingest", message="m")
    raws = r.lrange(callbacks.QUEUE_PREFIX + job_id, 0, -1)
    for raw in raws:  # as the dispatcher leaves events past the schedule
        e = json.loads(raw)
        ids.append(e["event_id"])
        r.rpush(callbacks.DEAD_PREFIX + job_id, json.dumps({**e, "attempts": 8, "last_error": "HTTP 500"}))
    r.delete(callbacks.QUEUE_PREFIX + job_id)
    return job_id, ids, r


def test_replay_route_is_the_owners_and_keeps_order_and_ids(clients: tuple[TestClient, TestClient]) -> None:
    a, b = clients
    job_id, ids, r = _job_with_dead_letters(a, 4)
    assert b.post(f"/jobs/{job_id}/callbacks/replay").status_code == 404  # another key's job
    bad = a.post(f"/jobs/{job_id}/callbacks/replay", json={"since": f"{job_id}:nope"})
    assert bad.status_code == 422 and bad.json()["code"] == "UNKNOWN_EVENT"
    resp = a.post(f"/jobs/{job_id}/callbacks/replay", json={"since": ids[1]})
    assert resp.status_code == 200 and resp.json() == {"job_id": job_id, "replayed": ids[2:]}
    queued = [json.loads(x) for x in r.lrange(callbacks.QUEUE_PREFIX + job_id, 0, -1)]
    assert [e["event_id"] for e in queued] == ids[2:] and {e["attempts"] for e in queued} == {0}
    assert r.zscore(callbacks.DUE_KEY, job_id) is not None
    rest = a.post(f"/jobs/{job_id}/callbacks/replay")
    assert rest.json()["replayed"] == ids[:2]
    queued = [json.loads(x)["event_id"] for x in r.lrange(callbacks.QUEUE_PREFIX + job_id, 0, -1)]
    assert queued == ids[:2] + ids[2:]  # replayed ahead, in the log's order
    assert CallbackOutbox(r).dead(job_id) == []


def test_operator_replay_command(clients: tuple[TestClient, TestClient]) -> None:
    import subprocess
    import sys

    a, _ = clients
    job_id, ids, r = _job_with_dead_letters(a, 2)
    url = a.app.state.shim.settings.redis_url  # type: ignore[attr-defined]
    env = {**__import__("os").environ, "ECG_REDIS_URL": url}
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.app", "-b", url, "jobs", "replay", job_id],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{job_id}: 2 event(s) queued again" in out.stdout and all(i in out.stdout for i in ids)
    assert [json.loads(x)["event_id"] for x in r.lrange(callbacks.QUEUE_PREFIX + job_id, 0, -1)] == ids
