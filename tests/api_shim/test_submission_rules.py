"""Submission rules that a backend builds on (issue 23's shim-side holes), against a real Redis.

* The locale taken from ``Accept-Language`` is not part of the request's identity: the same body
  re-POSTed with another header is the same job (200), not a 409.
* An idempotent repeat is not a new submission: it does not count towards the per-key rate.
* The queue position is read from an index, not by scanning the queue: it stays right with
  priorities and as jobs ahead are taken.
* Uploads: the size cap holds while a chunked body streams in (no Content-Length), on every
  upload route, and a rate-limited key is refused before a byte is stored.

The apps run in-process (``TestClient`` without its lifespan) on a database no worker reads.
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
KEY = "tenant-a-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _db(redis_url: str, n: int = 6) -> str:
    """Database 6: no worker listens there, so accepted jobs only wait."""
    return redis_url.rsplit("/", 1)[0] + f"/{n}"


def _app(base_url: str, tmp_path: Path, **extra: Any) -> Any:
    from api_shim.app import create_app
    from ecg_audio.settings import Settings

    extra.setdefault("redis_url", _db(base_url))
    settings = Settings(
        api_keys=[KEY],
        workspace_root=tmp_path / "ws",
        output_root=tmp_path / "out",
        **extra,
    )
    return create_app(settings)


@pytest.fixture
def client(redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    yield TestClient(_app(redis_url, tmp_path), headers=AUTH)


def _body(job_id: str, **extra: Any) -> dict[str, Any]:
    return {"job_id": job_id, "video_url": "upload://" + uuid.uuid4().hex, **extra}


def test_the_same_body_with_another_accept_language_is_the_same_job(client: TestClient) -> None:
    job_id = f"locale-{uuid.uuid4().hex[:10]}"
    body = _body(job_id)
    first = client.post(PROCESS, json=body, headers={"Accept-Language": "ko-KR,ko;q=0.9"})
    assert first.status_code == 202, first.text
    again = client.post(PROCESS, json=body, headers={"Accept-Language": "en-US"})
    assert again.status_code == 200, again.text  # was 409: the header's locale had become part of the body
    # the job still speaks the locale it was created with
    rec = client.get(f"/jobs/{job_id}", headers={"Accept-Language": "en"})
    assert rec.status_code == 200
    # a body that names its own locale is still compared on it
    named = _body(f"named-{uuid.uuid4().hex[:10]}", options={"locale": "ko"})
    assert client.post(PROCESS, json=named).status_code == 202
    changed = client.post(PROCESS, json={**named, "options": {"locale": "en"}})
    assert changed.status_code == 409 and "options" in changed.json()["detail"], changed.text


def test_the_header_locale_still_reaches_the_worker(client: TestClient, redis_url: str) -> None:
    import json

    job_id = f"locale-{uuid.uuid4().hex[:10]}"
    assert client.post(PROCESS, json=_body(job_id), headers={"Accept-Language": "ko"}).status_code == 202
    from ecg_audio.jobs import JobStore

    rec = JobStore(redis.Redis.from_url(_db(redis_url), decode_responses=True), 3600).get(job_id)
    assert rec is not None
    from tasks.stages import JobSpec

    assert JobSpec.from_request(job_id, json.loads(json.dumps(rec.request))).options.get("locale") == "ko"


def test_idempotent_repeats_do_not_count_towards_the_rate(redis_url: str, tmp_path: Path) -> None:
    client = TestClient(_app(redis_url, tmp_path, submit_rate_per_key=2, submit_rate_window_s=600), headers=AUTH)
    redis.Redis.from_url(_db(redis_url)).delete(*(redis.Redis.from_url(_db(redis_url)).keys("ecg:limit:*") or ["-"]))
    body = _body(f"repeat-{uuid.uuid4().hex[:10]}")
    assert client.post(PROCESS, json=body).status_code == 202
    for _ in range(5):  # a backend retrying a POST whose answer it lost
        r = client.post(PROCESS, json=body)
        assert r.status_code == 200, r.text
    # the key has used one of its two submissions: a second new job is admitted, a third is not
    assert client.post(PROCESS, json=_body(f"second-{uuid.uuid4().hex[:10]}")).status_code == 202
    third = client.post(PROCESS, json=_body(f"third-{uuid.uuid4().hex[:10]}"))
    assert third.status_code == 429 and third.json()["code"] == "RATE_LIMITED", third.text
    redis.Redis.from_url(_db(redis_url)).delete(*(redis.Redis.from_url(_db(redis_url)).keys("ecg:limit:*") or ["-"]))


def test_queue_position_follows_priority_and_the_jobs_taken(redis_url: str, tmp_path: Path) -> None:
    from ecg_audio.chain import ChainMessages
    from ecg_audio.job_events import JobEvents
    from ecg_audio.jobs import JobStore

    url = _db(redis_url, 7)
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    client = TestClient(_app(redis_url, tmp_path, redis_url=url), headers=AUTH)
    ids = [f"pos-{i}-{uuid.uuid4().hex[:6]}" for i in range(5)]
    for job_id in ids:
        assert client.post(PROCESS, json=_body(job_id)).status_code == 202
    # an operator's urgent job (a lower priority number is served first by kombu) and a lazy one
    store, messages = JobStore(r, 3600), ChainMessages()
    urgent, lazy = f"urgent-{uuid.uuid4().hex[:6]}", f"lazy-{uuid.uuid4().hex[:6]}"
    for job_id, priority in ((urgent, 0), (lazy, 9)):
        created, _ = store.create_or_get(job_id, _body(job_id), message=messages.build(job_id, priority=priority))
        assert created
    positions = {j: client.get(f"/jobs/{j}").json()["queue_position"] for j in [*ids, urgent, lazy]}
    assert [positions[j] for j in ids] == [0, 1, 2, 3, 4] and positions[urgent] == 5, positions
    assert positions[lazy] == 6, positions  # behind every job of a more urgent priority
    # a worker takes the first two jobs: the rest move up by two
    events = JobEvents(r, 3600)
    for job_id in ids[:2]:
        assert events.progress(job_id, progress=5, stage="ingest", message="Downloading")
    after = {j: client.get(f"/jobs/{j}").json()["queue_position"] for j in [*ids[2:], lazy]}
    assert all(after[j] == positions[j] - 2 for j in after), (positions, after)
    assert client.get(f"/jobs/{ids[0]}").json()["queue_position"] is None  # no longer waiting
    r.flushdb()


def test_queue_position_reads_an_index_not_the_queue(redis_url: str, tmp_path: Path) -> None:
    """The position of the last of many queued jobs costs no scan of the queue list (LRANGE)."""
    r = redis.Redis.from_url(_db(redis_url, 8), decode_responses=True)
    r.flushdb()
    client = TestClient(_app(redis_url, tmp_path, redis_url=_db(redis_url, 8)), headers=AUTH)
    ids = [f"many-{i}-{uuid.uuid4().hex[:6]}" for i in range(300)]
    for job_id in ids:
        assert client.post(PROCESS, json=_body(job_id)).status_code == 202
    r.config_resetstat()
    assert client.get(f"/jobs/{ids[-1]}").json()["queue_position"] == 299
    stats = r.info("commandstats")
    assert "cmdstat_lrange" not in stats, stats.get("cmdstat_lrange")
    r.flushdb()


def _chunked(total: int, piece: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        n = min(piece, total - sent)
        sent += n
        yield b"\0" * n


def _stored(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "uploads").rglob("*") if p.is_file()]


def test_a_chunked_upload_past_the_cap_is_refused_while_it_streams(redis_url: str, tmp_path: Path) -> None:
    client = TestClient(_app(redis_url, tmp_path, max_download_bytes=256 * 1024), headers=AUTH)
    r = client.post("/api/uploads", content=_chunked(1024 * 1024))  # no Content-Length: chunked
    assert r.status_code == 413 and r.json()["code"] == "PAYLOAD_TOO_LARGE", r.text
    assert _stored(tmp_path) == []


def test_a_chunked_multipart_past_the_cap_is_refused_before_it_is_spooled(redis_url: str, tmp_path: Path) -> None:
    """The OpenAI route parses multipart: a chunked body must not be read (and spooled) past the cap.

    Driven as a server drives the app (ASGI ``receive`` one chunk at a time; a test client would
    read the whole body before the app sees it), counting the chunks the app asked for.
    """
    import asyncio

    cap, piece = 256 * 1024, 64 * 1024
    app = _app(redis_url, tmp_path, max_download_bytes=cap)
    boundary = "xYzBoundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    chunks = [head, *_chunked(16 * cap, piece), f"\r\n--{boundary}--\r\n".encode()]
    asked, sent = 0, []

    async def receive() -> dict[str, Any]:
        nonlocal asked
        asked += 1
        if asked <= len(chunks):
            return {"type": "http.request", "body": chunks[asked - 1], "more_body": asked < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/audio/transcriptions",
        "raw_path": b"/v1/audio/transcriptions",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"authorization", f"Bearer {KEY}".encode()),
            (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
            (b"transfer-encoding", b"chunked"),
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
        "state": {},
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 413, sent
    assert b"PAYLOAD_TOO_LARGE" in b"".join(m.get("body", b"") for m in sent)
    # the body stopped being read just past the cap: the parser never held (nor spooled) the rest
    assert (asked - 1) * piece <= cap + 2 * piece, f"read {asked} chunks of {len(chunks)}"
    assert _stored(tmp_path) == []


def test_a_rate_limited_key_stores_no_upload(redis_url: str, tmp_path: Path) -> None:
    r = redis.Redis.from_url(_db(redis_url))
    r.delete(*(r.keys("ecg:limit:*") or ["-"]))
    client = TestClient(_app(redis_url, tmp_path, submit_rate_per_key=1, submit_rate_window_s=600), headers=AUTH)
    assert client.post(PROCESS, json=_body(f"first-{uuid.uuid4().hex[:8]}")).status_code == 202
    up = client.post("/api/uploads", content=b"RIFF" + b"\0" * 1000)
    assert up.status_code == 429 and up.json()["code"] == "RATE_LIMITED", up.text
    files = {"file": ("a.wav", b"RIFF" + b"\0" * 1000, "audio/wav")}
    oai = client.post("/v1/audio/transcriptions", data={"model": "whisper-1"}, files=files)
    assert oai.status_code == 429 and oai.json()["code"] == "RATE_LIMITED", oai.text
    assert _stored(tmp_path) == []
    r.delete(*(r.keys("ecg:limit:*") or ["-"]))
