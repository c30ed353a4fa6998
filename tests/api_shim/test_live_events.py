"""GET /jobs/{id}/events (Server-Sent Events) through a real shim on a real Redis.

The shim here runs with a 1 s keep-alive so the quiet-stream paths are seen quickly. The events
are written with ``ecg_audio.event_log.append``, exactly as the workers write them; the real-job
test (a worker, the sample call) is in tests/system/test_job_page.py, where the worker is shared.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from api_shim.view_tokens import make_token, view_secret
from ecg_audio import event_log
from ecg_audio.jobs import JobStore
from ecg_audio.settings import Settings
from tests.conftest import API_KEY, Proc, free_port
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(300)

OTHER_KEY = "another-tenant-key-0123456789"


@pytest.fixture(scope="module")
def live_shim(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The shim with a 1 s keep-alive (the session's shim keeps the default 15 s)."""
    port = free_port()
    env = {
        **stack_env,
        "ECG_SSE_KEEPALIVE_S": "1",
        "ECG_API_KEYS": json.dumps([API_KEY, OTHER_KEY]),
        "ECG_S3_INPUT_PREFIXES": json.dumps(["bucket"]),  # s3:// inputs are refused unless scoped
    }
    log = tmp_path_factory.mktemp("logs") / "live-shim.log"
    p = Proc("live-shim", [sys.executable, "-m", "uvicorn", "api_shim.app:app", "--host", "127.0.0.1",
                           "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: p.answers(url + "/health"), 120, interval=0.3, what=lambda: "live shim:\n" + p.tail())
    yield url
    p.stop()


@pytest.fixture()
def client(live_shim: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_shim, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as c:
        yield c


@pytest.fixture()
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


class Sse:
    """What one connection to an event stream received."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.comments = 0
        self.ended = False
        self.status = 0

    @property
    def ids(self) -> list[str]:
        return [i for i, _ in self.events]


def read_sse(
    client: httpx.Client,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    stop_after: int | None = None,
    out: Sse | None = None,
) -> Sse:
    """Read a stream until it ends, or until ``stop_after`` events (then hang up, as a dropped client).

    ``out``: fill this ``Sse`` as lines arrive, so that another thread can see how far it got."""
    out = out if out is not None else Sse()
    timeout = httpx.Timeout(connect=10, read=60, write=10, pool=10)
    with client.stream("GET", url, headers=headers or {}, timeout=timeout) as resp:
        out.status = resp.status_code
        if resp.status_code != 200:
            resp.read()
            return out
        assert resp.headers["content-type"].startswith("text/event-stream")
        event_id, data = None, None
        for line in resp.iter_lines():
            if line.startswith(":"):
                out.comments += 1
            elif line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data = line[6:]
            elif line == "" and data is not None:
                assert event_id, "every event carries an id"
                out.events.append((event_id, json.loads(data)))
                event_id, data = None, None
                if stop_after is not None and len(out.events) >= stop_after:
                    return out
        out.ended = True
    return out


def new_job(r: redis.Redis) -> str:
    job = f"sse-{uuid.uuid4().hex[:8]}"
    # a record with no queued message: nothing runs it; the test plays the worker
    JobStore(r, 3600).create(job, {"job_id": job, "video_url": "s3://bucket/none.wav"})
    return job


def emit(r: redis.Redis, job: str, progress: int, *, final: bool = False) -> str:
    event_id = event_log.new_event_id(job, final=final)
    status = "completed" if final else "processing"
    payload = {"job_id": job, "status": status, "progress": progress, "message": f"{progress}"}
    event_log.append(r, job, event_id, payload)
    return event_id


def test_reconnect_with_last_event_id_gets_what_was_missed_once(client: httpx.Client, r: redis.Redis) -> None:
    job = new_job(r)
    sent = [emit(r, job, p) for p in (10, 25, 40)]
    first = read_sse(client, f"/jobs/{job}/events", stop_after=2)  # connects mid-job, hangs up after 2
    assert first.ids == sent[:2]
    assert [e["progress"] for _, e in first.events] == [10, 25]
    assert all(e["event_id"] == i for i, e in first.events)  # the id is the callback's event id
    sent += [emit(r, job, p) for p in (60, 70)]  # happen while the client is away

    second = Sse()

    def finish() -> None:
        # a keep-alive comment: the reconnected client has what it missed and waits on a quiet stream
        wait_for(lambda: second.comments >= 1, what="a keep-alive comment on the quiet stream")
        sent.append(emit(r, job, 80))
        sent.append(emit(r, job, 100, final=True))

    writer = threading.Thread(target=finish)
    writer.start()
    read_sse(client, f"/jobs/{job}/events", headers={"Last-Event-ID": first.ids[-1]}, out=second)
    writer.join()
    assert second.ended, "the stream ends after the final event"
    assert first.ids + second.ids == sent, "every event once, in order"
    assert second.ids[-1] == f"{job}:final" and second.events[-1][1]["status"] == "completed"
    assert second.comments >= 1, "a quiet stream sends keep-alive comments"
    # a browser that saw the final event and reconnects anyway is told to stop (204)
    again = read_sse(client, f"/jobs/{job}/events", headers={"Last-Event-ID": f"{job}:final"})
    assert again.status == 204
    # a fresh client gets the whole log and the end
    assert read_sse(client, f"/jobs/{job}/events").ids == sent


def test_page_token_opens_the_stream_of_its_job_only(live_shim: str, r: redis.Redis) -> None:
    job, other = new_job(r), new_job(r)
    emit(r, job, 100, final=True)
    secret = view_secret(Settings(api_keys=[API_KEY, OTHER_KEY]))
    assert secret is not None
    good = make_token(secret, job, int(time.time()) + 600)
    with httpx.Client(base_url=live_shim, timeout=30) as anon:  # no API key
        assert read_sse(anon, f"/jobs/{job}/events?token={good}").ids == [f"{job}:final"]
        assert anon.get(f"/jobs/{job}/events").status_code == 401
        for bad in (
            good[:-2] + ("AA" if not good.endswith("AA") else "BB"),  # tampered
            make_token(secret, job, int(time.time()) - 1),  # expired
            make_token(b"another secret", job, int(time.time()) + 600),
        ):
            assert anon.get(f"/jobs/{job}/events?token={bad}").status_code == 403
        # a token is for one job: it opens nothing else
        assert anon.get(f"/jobs/{other}/events?token={good}").status_code == 403
        assert anon.get(f"/jobs/{other}/view/data?token={good}").status_code == 403


def test_cancelled_job_stream_ends_with_its_final_event(client: httpx.Client, r: redis.Redis) -> None:
    """Cancelled through the API (DELETE ends the job and writes its final event, no worker reports)."""
    job = new_job(r)
    sent = [emit(r, job, 10)]
    assert client.delete(f"/jobs/{job}").json()["status"] == "failed"
    got = read_sse(client, f"/jobs/{job}/events")
    assert got.ended
    assert got.ids == [*sent, f"{job}:final:1"]  # the first run's final event
    final = got.events[-1][1]
    assert final["status"] == "failed" and final["error_code"] == "CANCELLED"
    # it went into the log: every reader sees the same final event
    assert [e.event_id for e in event_log.read_all(r, job)] == got.ids


def test_job_ended_without_final_event_gets_one_from_its_record(client: httpx.Client, r: redis.Redis) -> None:
    """A record that ended with no final event in its log (written before the event log existed): the
    stream builds the final event from the record, and still ends."""
    job = new_job(r)
    sent = [emit(r, job, 10)]
    r.hset(f"ecg:job:{job}", mapping={"status": "failed", "error_code": "CANCELLED", "error_message": "cancelled"})
    got = read_sse(client, f"/jobs/{job}/events")
    assert got.ended
    assert got.ids == [*sent, f"{job}:final:1"]  # written by the one event builder, as every final is
    final = got.events[-1][1]
    assert final["status"] == "failed" and final["error_code"] == "CANCELLED"
    assert r.hget(f"ecg:job:{job}", "final_event_id") == f"{job}:final:1"  # once: the record knows it is out


def test_unknown_job_is_404(client: httpx.Client) -> None:
    assert client.get("/jobs/no-such-job-here/events").status_code == 404


def test_many_streams_on_one_event_loop(client: httpx.Client, r: redis.Redis, live_shim: str) -> None:
    """Twenty streams wait at once on one shim process, each gets its own job's events (no thread each)."""
    jobs = [new_job(r) for _ in range(20)]
    results = {j: Sse() for j in jobs}

    def listen(job: str) -> None:
        with httpx.Client(base_url=live_shim, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            read_sse(c, f"/jobs/{job}/events", out=results[job])

    threads = [threading.Thread(target=listen, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    # every stream has sent a keep-alive comment: all twenty are open and waiting at once
    wait_for(lambda: all(s.comments >= 1 for s in results.values()), what="twenty streams waiting")
    expected = {j: [emit(r, j, 50), emit(r, j, 100, final=True)] for j in jobs}
    for t in threads:
        t.join(60)
    assert {j: results[j].ids for j in jobs} == expected



def test_another_keys_job_is_not_found(client: httpx.Client, live_shim: str) -> None:
    job = f"tenant-{uuid.uuid4().hex[:8]}"
    body = {"job_id": job, "video_url": "s3://bucket/nothing-here.wav"}
    assert client.post("/api/upload-video/process-video", json=body).status_code == 202
    view_url = client.get(f"/jobs/{job}").json()["view_url"]
    with httpx.Client(base_url=live_shim, headers={"Authorization": f"Bearer {OTHER_KEY}"}, timeout=30) as other:
        for path in (f"/jobs/{job}/events", f"/jobs/{job}/view/data", f"/jobs/{job}/view"):
            resp = other.get(path)
            assert resp.status_code == 404, (path, resp.status_code)
            assert resp.headers["content-type"].startswith("application/problem+json")
    # the page link itself works for whoever holds it, without a key
    assert httpx.get(view_url, timeout=30).status_code == 200


def test_after_a_requeue_the_stream_carries_the_new_run(client: httpx.Client, r: redis.Redis) -> None:
    """Final ids ``{job}:final:{run}``: a client holding run 1's final event gets 204 until a new run
    starts, then the new run's events (it is not told to stop for good by an earlier final)."""
    job = new_job(r)
    for eid in (f"{job}:a", f"{job}:final:1"):
        event_log.append(r, job, eid, {"job_id": job, "status": "processing", "progress": 10})
    assert read_sse(client, f"/jobs/{job}/events", headers={"Last-Event-ID": f"{job}:final:1"}).status == 204
    for eid in (f"{job}:b", f"{job}:final:2"):
        event_log.append(r, job, eid, {"job_id": job, "status": "processing", "progress": 10})
    got = read_sse(client, f"/jobs/{job}/events", headers={"Last-Event-ID": f"{job}:final:1"})
    assert got.ended and got.ids == [f"{job}:b", f"{job}:final:2"]
    assert read_sse(client, f"/jobs/{job}/events").ids == [f"{job}:a", f"{job}:final:1", f"{job}:b", f"{job}:final:2"]


def test_websocket_variant_carries_the_same_events(live_shim: str, r: redis.Redis) -> None:
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    job = new_job(r)
    first = emit(r, job, 10)
    secret = view_secret(Settings(api_keys=[API_KEY, OTHER_KEY]))
    assert secret is not None
    token = make_token(secret, job, int(time.time()) + 600)
    ws_base = live_shim.replace("http://", "ws://")
    got: list[dict[str, Any]] = []
    with connect(f"{ws_base}/jobs/{job}/events/ws?token={token}", open_timeout=30) as ws:
        got.append(json.loads(ws.recv(timeout=30)))
        later = [emit(r, job, 60), emit(r, job, 100, final=True)]
        try:
            while True:
                got.append(json.loads(ws.recv(timeout=30)))
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 1000  # a normal close after the final event
    assert [m["id"] for m in got] == [first, *later]
    assert all(m["data"]["event_id"] == m["id"] for m in got)
    # resume, and refusal without a key or token
    with connect(f"{ws_base}/jobs/{job}/events/ws?token={token}&last_event_id={later[0]}", open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["id"] == later[1]
    with pytest.raises((InvalidStatus, ConnectionClosed)):
        with connect(f"{ws_base}/jobs/{job}/events/ws", open_timeout=30) as ws:
            ws.recv(timeout=10)
