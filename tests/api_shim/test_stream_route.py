"""WS /v1/stream end to end: real Redis, a real stream worker process (real models), the real shim
under uvicorn, a real WebSocket client (``ecg_cli.stream.LiveClient``, what ``ecg-audio stream`` runs),
and a real Celery worker that refines the job the stream became.

The stream worker is killed in the last test: the client hears ``STREAM_WORKER_LOST``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from ecg_audio import keys, live
from ecg_cli.stream import LiveClient, file_audio, file_pcm
from ops.stack import stream_worker_command
from pipeline.errors import InvalidMediaError, NoStreamSlotError, StreamWorkerLostError, UnsupportedOptionError
from tests.conftest import API_KEY, LIVE_DB, Proc, free_port, start_worker, wait_job
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def live_env(redis_url: str, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    url = redis_url.rsplit("/", 1)[0] + f"/{LIVE_DB}"
    redis.Redis.from_url(url).flushdb()
    var = tmp_path_factory.mktemp("live-var")
    return stack_env | {
        "ECG_REDIS_URL": url,
        "ECG_VAR_DIR": str(var),
        "ECG_WORKSPACE_ROOT": str(var / "workspaces"),
        "ECG_OUTPUT_ROOT": str(var / "output"),
        "ECG_STREAM_SLOTS": "1",
        # English only, CAM++ in eager torch: nothing to join or export at start
        "ECG_ASR_MULTILINGUAL_MODEL": "none",
        "ECG_DIARIZATION_RUNTIME": "torch",
        "ECG_CPU_THREADS": "2",
    }


@pytest.fixture(scope="module")
def stream_worker(live_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    log = tmp_path_factory.mktemp("logs") / "stream-worker.log"
    proc = Proc("stream-worker", stream_worker_command(), live_env, log)
    r = redis.Redis.from_url(live_env["ECG_REDIS_URL"])

    def ready() -> bool:
        proc.check_alive()
        return live.slot_counts(r) == (0, 1)

    wait_for(ready, 300, interval=0.3, what=lambda: "stream worker:\n" + proc.tail())
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def stage_worker(live_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """The batch chain's worker for the jobs the streams become (it loads while the stream worker does)."""
    proc = start_worker(live_env, tmp_path_factory.mktemp("logs") / "stage-worker.log", name="live-w")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def live_shim(live_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "live-shim.log"
    cmd = [sys.executable, "-m", "uvicorn", "api_shim.app:app", "--host", "127.0.0.1", "--port", str(port)]
    proc = Proc("shim", cmd, live_env, log)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: proc.answers(url + "/health/live"), 120, interval=0.3, what=lambda: "shim:\n" + proc.tail())
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def sample_pcm(sample_wav: Path) -> bytes:
    return file_pcm(sample_wav)


def _ws(url: str) -> str:
    return url.replace("http://", "ws://")


def test_a_stream_sends_finals_with_speakers_then_becomes_a_refined_job(
    live_shim: str, stage_worker: Proc, stream_worker: Proc, sample_pcm: bytes
) -> None:
    client = LiveClient(_ws(live_shim), api_key=API_KEY, query={"language": "en", "job_id": "live-e2e-1"})
    messages = list(client.run(sample_pcm, speed=4.0))
    kinds = [m["type"] for m in messages]
    assert kinds[-1] == "end", messages[-3:]
    assert "partial" in kinds and kinds.index("partial") < kinds.index("final")
    finals = [m for m in messages if m["type"] == "final"]
    assert len(finals) >= 5 and all(f["speaker"] and f["language"] == "en" and f["words"] for f in finals)
    assert [f["id"] for f in finals] == list(range(len(finals)))
    assert messages[-1]["job_id"] == "live-e2e-1"
    with httpx.Client(base_url=live_shim, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as api:
        assert api.get("/jobs/live-e2e-1").status_code == 200
        done = wait_job(api, "live-e2e-1", timeout=480)
    assert done["status"] == "completed", (done, stage_worker.tail())
    result = done["result"]
    assert result["segments"] and result["metadata"]["duration"] == pytest.approx(len(sample_pcm) / 32000, abs=0.1)
    assert [f["text"] for f in result["live"]["finals"]] == [f["text"] for f in finals]
    assert result["live"]["language"] == "en" and result["metadata"]["speakers_detected"] == 2


def test_a_browser_recording_in_webm_opus_streams_and_becomes_its_job(
    live_shim: str, stage_worker: Proc, stream_worker: Proc, sample_wav: Path, tmp_path: Path
) -> None:
    """What a browser's MediaRecorder sends (WebM Opus) is decoded in the shim: finals with words,
    and the job holds the decoded recording (its duration)."""
    clip = tmp_path / "clip.wav"
    with wave.open(str(sample_wav)) as w, wave.open(str(clip), "wb") as out:
        out.setparams(w.getparams())
        w.setpos(6 * w.getframerate())  # the call's first words, at 6.7 s
        out.writeframes(w.readframes(12 * w.getframerate()))
    audio, duration = file_audio(clip, "webm_opus")
    assert audio[:4] == b"\x1a\x45\xdf\xa3"  # an EBML (WebM) header: what is sent is not pcm
    query = {"language": "en", "job_id": "live-webm-1", "encoding": "webm_opus"}
    messages = list(LiveClient(_ws(live_shim), api_key=API_KEY, query=query).run(audio, speed=4.0, duration_s=duration))
    assert messages[-1] == {"type": "end", "job_id": "live-webm-1"}, messages[-3:]
    finals = [m for m in messages if m["type"] == "final"]
    assert len(finals) >= 2 and all(f["words"] for f in finals), finals
    text = " ".join(f["text"] for f in finals).lower()
    # the clip's 9-12 s: "This is Diane in New Jersey." "And I'm Sheila and I'm in Texas, originally from Chicago."
    assert sum(word in text for word in ("diane", "jersey", "sheila", "chicago")) >= 2, text
    with httpx.Client(base_url=live_shim, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as api:
        done = wait_job(api, "live-webm-1", timeout=480)
    assert done["status"] == "completed", (done, stage_worker.tail())
    assert done["result"]["metadata"]["duration"] == pytest.approx(12.0, abs=0.15)


def test_data_that_is_not_the_encoding_ends_the_stream_with_invalid_media(live_shim: str, stream_worker: Proc) -> None:
    query = {"language": "en", "encoding": "ogg_opus"}
    messages = list(LiveClient(_ws(live_shim), api_key=API_KEY, query=query).run(b"not ogg at all " * 2000, speed=50.0))
    assert messages and messages[-1]["type"] == "error", messages[-3:]
    assert messages[-1]["code"] == InvalidMediaError.code and "ogg_opus" in messages[-1]["message"]
    r = redis.Redis.from_url(stream_worker.env["ECG_REDIS_URL"])
    wait_for(lambda: live.slot_counts(r) == (0, 1), 30, what="the failed stream's slot given back")
    for bad in ({"encoding": "mp3"}, {"encoding": "webm_opus", "sample_rate": "48000"}):
        refused = _refusal(LiveClient(_ws(live_shim), api_key=API_KEY, query=bad))
        assert refused.status_code == 422 and json.loads(refused.body)["code"] == UnsupportedOptionError.code, bad


def test_a_browser_token_opens_a_stream_and_a_full_worker_refuses_the_next(
    live_shim: str, stream_worker: Proc, sample_pcm: bytes
) -> None:
    with httpx.Client(base_url=live_shim, headers={"Authorization": f"Bearer {API_KEY}"}) as api:
        token = api.post("/v1/stream/token").json()["token"]
    first = LiveClient(_ws(live_shim), token=token, query={"language": "en"})
    r = redis.Redis.from_url(stream_worker.env["ECG_REDIS_URL"])
    ws = first.connect()  # holds the one slot
    try:
        wait_for(lambda: live.slot_counts(r)[1] == 0, 30)
        refused = _refusal(LiveClient(_ws(live_shim), api_key=API_KEY))
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        assert json.loads(refused.body)["code"] == NoStreamSlotError.code
        held = keys.LIVE_PER_KEY + token.partition(".")[0]  # the key's live streams: the refused one gave its back
        assert r.zcard(held) == 1
        assert _refusal(LiveClient(_ws(live_shim), token=token + "x")).status_code == 403
    finally:
        ws.close()
    wait_for(lambda: r.zcard(held) == 0, 30, what="the ended stream's hold on its key given back")


def test_one_key_holds_at_most_its_live_streams(live_shim: str, stream_worker: Proc) -> None:
    """ECG_MAX_LIVE_STREAMS_PER_KEY (2): while two live streams of this key are held (here by another
    shim's leases), the next is refused with 429 before the upgrade, whatever slots are free."""
    r = redis.Redis.from_url(stream_worker.env["ECG_REDIS_URL"])
    with httpx.Client(base_url=live_shim, headers={"Authorization": f"Bearer {API_KEY}"}) as api:
        held = keys.LIVE_PER_KEY + api.post("/v1/stream/token").json()["token"].partition(".")[0]
    lease_end = int((time.time() + 600) * 1000)
    r.zadd(held, {"other-shim-a": lease_end, "other-shim-b": lease_end})
    try:
        refused = _refusal(LiveClient(_ws(live_shim), api_key=API_KEY))
        assert refused.status_code == 429 and refused.headers["Retry-After"]
        assert json.loads(refused.body)["code"] == "TOO_MANY_STREAMS"
        assert r.zcard(held) == 2
    finally:
        r.delete(held)


def _refusal(client: LiveClient) -> Any:
    """The HTTP answer that refused the WebSocket handshake."""
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as refused:
        client.connect().close()
    return refused.value.response


def test_a_killed_stream_worker_is_reported_to_its_client_and_the_other_stream_carries_on(
    live_shim: str, stream_worker: Proc, sample_pcm: bytes, tmp_path: Path
) -> None:
    r = redis.Redis.from_url(stream_worker.env["ECG_REDIS_URL"])
    wait_for(lambda: live.slot_counts(r) == (0, 1), 60, what="the slot of the previous test freed")
    other = Proc("stream-worker-2", stream_worker_command(), stream_worker.env, tmp_path / "stream-worker-2.log")
    try:

        def both_ready() -> bool:
            other.check_alive()
            return live.slot_counts(r) == (0, 2)

        wait_for(both_ready, 300, what=lambda: other.tail())
        clients = {
            job_id: LiveClient(_ws(live_shim), api_key=API_KEY, query={"language": "en", "job_id": job_id})
            for job_id in ("live-kill-a", "live-kill-b")
        }
        streams = {job_id: c.run(sample_pcm, speed=1.0, timeout=60) for job_id, c in clients.items()}
        firsts = {
            job_id: next(m for m in s if m["type"] in ("partial", "final", "error")) for job_id, s in streams.items()
        }
        assert all(m["type"] != "error" for m in firsts.values()), firsts
        # each worker has one slot: one stream on each; the first worker's dies with it
        doomed = next(j for j in clients if r.sismember(live.busy_key(_worker_id(r, stream_worker.popen.pid)), j))
        survivor = next(j for j in clients if j != doomed)
        killed_at = time.monotonic() - clients[doomed].started
        os.kill(stream_worker.popen.pid, signal.SIGKILL)
        rest = list(streams[doomed])
        assert rest and rest[-1]["type"] == "error", rest[-3:]
        assert rest[-1]["code"] == StreamWorkerLostError.code
        heard_after = clients[doomed].received[-1][0] - killed_at
        print(json.dumps({"worker_lost_heard_after_s": round(heard_after, 2)}))
        carried_on = list(streams[survivor])
        assert carried_on[-1] == {"type": "end", "job_id": survivor}, carried_on[-3:]
    finally:
        other.stop()


def _worker_id(r: redis.Redis, pid: int) -> str:
    """The live id of the stream worker with this process id (``host:pid:boot``)."""
    ids = [w.decode() for w in r.smembers(keys.LIVE_WORKERS)]  # type: ignore[union-attr]
    return next(w for w in ids if w.split(":")[1] == str(pid))
