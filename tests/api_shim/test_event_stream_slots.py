"""Event streams per API key: at most ``ECG_MAX_STREAMS_PER_KEY`` open (429 past it, on SSE and
WebSocket alike), and a WebSocket client that leaves gives its slot back at once: the server
reads the client's side, so a quiet job's stream does not outlive its client.

Served by a real uvicorn (a test client cancels the handler when its client leaves, which is not
what a server does: there a handler that never reads the socket never learns the client left).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import uvicorn
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.api_shim.test_submission_rules import AUTH, PROCESS, _app, _body, _db
from tests.conftest import free_port


@pytest.fixture
def served(redis_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    url = _db(redis_url, 9)
    redis.Redis.from_url(url).flushdb()
    # a long keep-alive: the freed slot below cannot come from a keep-alive noticing the client
    app = _app(redis_url, tmp_path, redis_url=url, max_streams_per_key=1, sse_keepalive_s=60)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"127.0.0.1:{port}", url
    finally:
        server.should_exit = True
        thread.join(30)


def test_streams_per_key_are_capped_and_a_gone_client_frees_its_slot(served: tuple[str, str]) -> None:
    host, url = served
    api = httpx.Client(base_url=f"http://{host}", headers=AUTH, timeout=30)
    job_id = f"quiet-{uuid.uuid4().hex[:8]}"  # queued on a database no worker reads: no events come
    assert api.post(PROCESS, json=_body(job_id)).status_code == 202
    ws_url = f"ws://{host}/jobs/{job_id}/events/ws"

    first = connect(ws_url, additional_headers=AUTH, open_timeout=30)
    with pytest.raises(InvalidStatus) as denied:
        connect(ws_url, additional_headers=AUTH, open_timeout=30)
    assert denied.value.response.status_code == 429 and b"TOO_MANY_STREAMS" in denied.value.response.body
    sse = api.get(f"/jobs/{job_id}/events")
    assert sse.status_code == 429 and sse.json()["code"] == "TOO_MANY_STREAMS", sse.text
    assert int(sse.headers["Retry-After"]) >= 1

    first.close()  # the client leaves; its job stays quiet
    deadline = time.monotonic() + 20  # far less than the 60 s keep-alive
    while True:
        try:
            connect(ws_url, additional_headers=AUTH, open_timeout=30).close()
            break
        except InvalidStatus:
            assert time.monotonic() < deadline, "the slot of a WebSocket client that left was not given back"
            time.sleep(0.2)
    r = redis.Redis.from_url(url, decode_responses=True)
    owner = r.hget(f"ecg:job:{job_id}", "owner")
    while r.zcard(f"ecg:streams:{owner}") != 0:  # the last stream's slot too, once its handler ended
        assert time.monotonic() < deadline + 20, r.zrange(f"ecg:streams:{owner}", 0, -1)
        time.sleep(0.2)
