"""WS /v1/stream end to end: real Redis, a real stream worker process (real models), the real shim
under uvicorn, a real WebSocket client (``ecg_cli.stream.LiveClient``, what ``ecg-audio stream`` runs),
and a real Celery worker that refines the job the stream became; ``WS /v1/realtime`` through the
official ``openai`` client's realtime connection, on the same stack.

The job page follows a stream live in headless Chromium (``tests/system/test_job_page.py``'s
driver), and ``ecg-audio stream --mic`` streams a virtual microphone (ffmpeg's lavfi input) until
Ctrl-C. The stream worker is killed in the last test: the client hears ``STREAM_WORKER_LOST``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import threading
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
from tests.conftest import API_KEY, LIVE_DB, REPO, Proc, free_port, start_worker, wait_job
from tests.helpers import wait_for
from tests.scoring import edits, load_reference, words
from tests.system.test_flower import chromium
from tests.system.test_job_page import ARTIFACTS, Chrome

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

IDLE_S = 10

OTHER_KEY = "other-tenant-key-0123456789"  # a second tenant of the same shim


@pytest.fixture(scope="module")
def live_env(redis_url: str, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    url = redis_url.rsplit("/", 1)[0] + f"/{LIVE_DB}"
    redis.Redis.from_url(url).flushdb()
    var = tmp_path_factory.mktemp("live-var")
    return stack_env | {
        "ECG_REDIS_URL": url,
        "ECG_API_KEYS": json.dumps([API_KEY, OTHER_KEY]),
        "ECG_VAR_DIR": str(var),
        "ECG_WORKSPACE_ROOT": str(var / "workspaces"),
        "ECG_OUTPUT_ROOT": str(var / "output"),
        "ECG_STREAM_SLOTS": "1",
        # a stream that gets no audio this long is ended as if stopped (the silent-client test)
        "ECG_STREAM_IDLE_S": str(IDLE_S),
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
    assert kinds[0] == "started" and messages[0]["job_id"] == "live-e2e-1", messages[:2]
    assert messages[0]["view_url"].startswith(live_shim + "/jobs/live-e2e-1/view?token=")
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


# the live page as a person sees it: per lane, its turns and its talk time (the talk-time table)
LIVE_PAGE = """JSON.stringify({
  lang: document.documentElement.lang,
  badge: (document.getElementById("status") || {}).textContent || "",
  status: document.body.dataset.status || null,
  live: document.body.dataset.live === "true",
  rendered: document.body.dataset.rendered === "true",
  partial: (document.getElementById("partial-text") || {}).textContent || "",
  lanes: Array.from(document.querySelectorAll("#timeline svg g.lane")).map(g => g.dataset.speaker),
  turns: Object.fromEntries(Array.from(document.querySelectorAll("#timeline svg g.lane")).map(
    g => [g.dataset.speaker, g.querySelectorAll("rect.turn").length])),
  talk: Object.fromEntries(Array.from(document.querySelectorAll("#talk-time tr.talk")).map(
    tr => [tr.dataset.speaker, Number(tr.querySelector(".talk-seconds").dataset.seconds)])),
  segments: Array.from(document.querySelectorAll("#transcript li.segment")).map(li => li.dataset.speaker),
})"""


def test_the_job_page_shows_the_stream_live_then_the_job_it_became(
    live_shim: str, stage_worker: Proc, stream_worker: Proc, sample_pcm: bytes, tmp_path: Path
) -> None:
    """The link in ``started`` opens the page while the stream runs (Korean: ``locale=ko``): a lane
    per speaker, growing as finals arrive, then, after stop, the refined job. Only that link or the
    owner's key opens it. Screenshot: var/test-artifacts/job-page-live.png."""
    job_id = "live-page-1"
    query = {"language": "en", "job_id": job_id, "locale": "ko"}
    client = LiveClient(_ws(live_shim), api_key=API_KEY, query=query)
    messages: list[dict[str, Any]] = []
    streaming = threading.Thread(target=lambda: messages.extend(client.run(sample_pcm, speed=1.5)), daemon=True)
    streaming.start()
    started = wait_for(lambda: next((m for _, m in client.received if m["type"] == "started"), None), 60)
    view_url = started["view_url"]
    token = view_url.partition("?token=")[2]

    with httpx.Client(base_url=live_shim, timeout=30) as anon:
        page = anon.get(view_url)
        assert page.status_code == 200 and '<html lang="ko">' in page.text
        assert anon.get(f"/jobs/{job_id}/view/data?token={token}").json()["live"] is True
        assert anon.get(f"/jobs/{job_id}/view").status_code == 401  # no link, no key
        assert anon.get(f"/jobs/live-other/view?token={token}").status_code == 403  # another job's link
        other = {"Authorization": f"Bearer {OTHER_KEY}"}
        for path in ("view", "view/data", "view/live"):
            assert anon.get(f"/jobs/{job_id}/{path}", headers=other).status_code == 404, path  # another tenant's
        assert anon.get(f"/jobs/{job_id}/view", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200

    chrome = Chrome(chromium(), tmp_path)
    try:
        chrome.open(view_url)
        looks: list[dict[str, Any]] = []

        def look() -> dict[str, Any]:
            state: dict[str, Any] = json.loads(chrome.js(LIVE_PAGE) or "{}")
            if state.get("live"):
                looks.append(state)
            return state

        def two_lanes_grown() -> bool:
            state = look()
            return len(state.get("lanes", [])) >= 2 and len(looks) >= 2 and _grew(looks[0], state)

        wait_for(two_lanes_grown, 120, interval=0.3, what=lambda: f"live lanes: {looks[-3:]} {chrome.console}")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        chrome.screenshot(ARTIFACTS / "job-page-live.png")
        first = looks[0]
        assert first["badge"] == "실시간" and first["lang"] == "ko", first
        streaming.join(120)
        assert messages and messages[-1] == {"type": "end", "job_id": job_id}, messages[-3:]
        speakers = {m["id"]: m["speaker"] for m in messages if m["type"] == "final"}
        speakers |= {m["id"]: m["speaker"] for m in messages if m["type"] == "speaker_update"}  # relabels, in order

        def off_live() -> dict[str, Any] | None:
            state = look()
            return None if state.get("live") else state

        ended = wait_for(off_live, 60, interval=0.2, what="the page left the live view")
        # until the refined result, the page keeps what the stream's client ended up with: every final, relabelled
        assert ended["segments"] == [speakers[i] for i in sorted(speakers)], (ended, speakers)
        last = looks[-1]
        assert any(s["partial"] for s in looks), "the words being heard (partials) were shown"
        assert len(last["lanes"]) >= 2 and all(last["talk"][spk] > 0 for spk in last["lanes"]), last
        # the lanes' bars grew while the stream ran: more turns or more talk time at a later look than
        # when the lane appeared. Not every lane: a voice whose one turn arrives in the last seconds
        # (late on a loaded machine) gets a lane that has no time left to grow
        grown = [
            spk
            for spk in last["lanes"]
            if (seen := next(s for s in looks if spk in s["lanes"]))
            and (last["turns"][spk] > seen["turns"][spk] or last["talk"][spk] > seen["talk"][spk])
        ]
        assert grown, (looks[:3], last)

        def finished_page() -> bool:
            return bool(look().get("rendered"))

        with httpx.Client(base_url=live_shim, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as api:
            done = wait_job(api, job_id, timeout=480)
        assert done["status"] == "completed", (done, stage_worker.tail())
        wait_for(finished_page, 120, interval=0.3, what=lambda: f"the refined job on the page: {look()}")
        final = look()
        assert final["badge"] == "완료" and not final["live"] and final["status"] == "completed"
        assert final["lanes"] == sorted(done["result"]["speakers"])
        assert final["segments"] == [seg["speaker"] for seg in done["result"]["segments"]]
        assert not chrome.console, chrome.console
    finally:
        chrome.close()


def _grew(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """More turns in the lanes, and more talk time, than at ``before``."""
    return sum(after["turns"].values()) > sum(before["turns"].values()) and sum(after["talk"].values()) > sum(
        before["talk"].values()
    )


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


def test_text_that_is_not_stop_is_ignored_and_the_stream_goes_on(
    live_shim: str, stream_worker: Proc, sample_pcm: bytes
) -> None:
    """Text frames other than ``{"type": "stop"}`` (JSON that is not an object, not JSON at all, another
    type) are ignored: the audio around them is transcribed and the stream ends at its stop."""
    client = LiveClient(_ws(live_shim), api_key=API_KEY, query={"language": "en"})
    speech = sample_pcm[int(8.4 * 32000) : int(10.1 * 32000)]  # "I didn't know you were there."
    with client.connect() as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "started"
        for frame in ("[1]", "not json", '{"type": "pause"}', "null"):
            ws.send(frame)
            ws.send(speech[: len(speech) // 4 // 2 * 2])
            speech = speech[len(speech) // 4 // 2 * 2 :]
        ws.send(speech)
        ws.send(json.dumps({"type": "stop"}))
        messages = []
        while not messages or messages[-1]["type"] not in ("end", "error"):
            messages.append(json.loads(ws.recv(timeout=120)))
    assert messages[-1]["type"] == "end" and messages[-1]["job_id"], messages[-3:]
    assert "there" in " ".join(m["text"] for m in messages if m["type"] == "final").lower(), messages


def test_a_client_that_goes_silent_gets_its_finals_and_its_job_after_the_idle_time(
    live_shim: str, stream_worker: Proc, sample_pcm: bytes
) -> None:
    """A client that sends speech, then nothing (no stop, connection open: a muted microphone, a
    stuck client) is not left waiting with its words unsaid: ECG_STREAM_IDLE_S after the last audio
    the stream ends as if stopped, with every final and the job it became."""
    speech = sample_pcm[int(6.5 * 32000) : int(15.0 * 32000)]  # "Hello? ... This is Diane in New Jersey."

    def then_silent() -> Iterator[bytes]:
        yield from (speech[i : i + 3200] for i in range(0, len(speech), 3200))
        time.sleep(600)  # no stop, no close: the stream must end without them

    client = LiveClient(_ws(live_shim), api_key=API_KEY, query={"language": "en"})
    t0 = time.monotonic()
    messages = list(client.stream(then_silent(), timeout=IDLE_S + 120))
    assert messages and messages[-1]["type"] == "end" and messages[-1]["job_id"], messages[-3:]
    assert time.monotonic() - t0 >= IDLE_S
    finals = " ".join(m["text"] for m in messages if m["type"] == "final")
    assert "Jersey" in finals, finals
    with httpx.Client(base_url=live_shim, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as api:
        assert api.get(f"/jobs/{messages[-1]['job_id']}").status_code == 200


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


REALTIME_SESSION = {
    "type": "transcription",
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
            "turn_detection": {"type": "server_vad"},
        }
    },
}


def _openai(shim: str, api_key: str = API_KEY) -> Any:
    import openai

    return openai.AsyncOpenAI(base_url=shim + "/v1", api_key=api_key, max_retries=0)


def test_the_openai_client_transcribes_a_realtime_session_with_speakers_and_it_becomes_a_job(
    live_shim: str, stage_worker: Proc, stream_worker: Proc, sample_pcm: bytes, sample_wav: Path
) -> None:
    """The official client's realtime connection (what tools written for OpenAI run) streams the
    sample as OpenAI's pcm16 (24 kHz), at 4x real time, in two turns, each ended by a commit (as a
    push-to-talk tool does): a commit makes what was heard final at once (the first turn's last
    sentence arrives before any more audio is sent) and the session goes on. One completed
    transcription per final, with deltas before, the speaker in a segment event; when the client
    closes, the recording is its job."""
    import numpy as np
    import soxr

    pcm24 = soxr.resample(np.frombuffer(sample_pcm, dtype="<i2"), 16000, 24000).astype("<i2").tobytes()
    chunk = 4800  # 100 ms of 24 kHz pcm16
    turn_end = int(14.4 * 10) * chunk  # just after "This is Diane in New Jersey." (sample.stm: 14.1 s)

    async def session() -> tuple[Any, Any, list[Any]]:
        events: list[Any] = []
        async with _openai(live_shim).realtime.connect(extra_query={"intent": "transcription"}) as conn:
            created = await conn.recv()
            await conn.session.update(session=REALTIME_SESSION)  # type: ignore[arg-type]
            updated = await conn.recv()

            async def turn(audio: bytes, until: Any) -> None:
                for i in range(0, len(audio), chunk):
                    await conn.input_audio_buffer.append(audio=base64.b64encode(audio[i : i + chunk]).decode())
                    await asyncio.sleep(0.1 / 4)
                await conn.input_audio_buffer.commit()
                while True:  # the turn's finals, made at the commit (or 20 s without an event)
                    try:
                        event = await asyncio.wait_for(conn.recv(), 20)
                    except TimeoutError:
                        return
                    events.append(event)
                    if event.type == "error" or (event.type.endswith("transcription.completed") and until(event)):
                        return

            await turn(pcm24[:turn_end], lambda e: e.end >= 13.5)
            first_turn.extend(e for e in events if e.type.endswith("transcription.completed"))
            await turn(pcm24[turn_end:], lambda e: e.end >= 29.0)  # the last words end at 29.9 s
        return created, updated, events

    first_turn: list[Any] = []

    created, updated, events = asyncio.run(asyncio.wait_for(session(), 300))
    # the commit made the first turn's last sentence final before any more audio came
    assert any(c.end >= 13.5 and "jersey" in c.transcript.lower() for c in first_turn), first_turn
    assert created.type == "session.created" and created.session.type == "transcription"
    assert updated.type == "session.updated", updated
    assert updated.session.audio.input.transcription.language == "en"
    assert all(e.type != "error" for e in events), [e for e in events if e.type == "error"]
    kinds = [e.type for e in events]
    items = [e for e in events if e.type == "conversation.item.input_audio_transcription.completed"]
    committed = [e.item_id for e in events if e.type == "input_audio_buffer.committed"]
    assert committed == [c.item_id for c in items]  # each item opened once, in order, before its events
    assert len({c.item_id for c in items}) == len(items)
    # a commit with nothing left to make final gets an empty item, as OpenAI answers one
    completed = [c for c in items if c.transcript]
    assert len(completed) >= 5 and all(c.speaker and c.content_index == 0 for c in completed), completed
    assert kinds.index("conversation.item.input_audio_transcription.delta") < kinds.index(completed[0].type)
    segments = {e.item_id: e for e in events if e.type == "conversation.item.input_audio_transcription.segment"}
    assert all(segments[c.item_id].text == c.transcript for c in completed)
    heard = " ".join(c.transcript for c in completed)
    reference = " ".join(t[3] for t in load_reference(sample_wav.with_suffix(".stm")))
    wer = edits(words(reference), words(heard)) / len(words(reference))
    print(json.dumps({"realtime_wer": round(wer, 3), "finals": len(completed)}))
    assert wer <= 0.35, heard
    job_id = created.session.id
    with httpx.Client(base_url=live_shim, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as api:
        done = wait_job(api, job_id, timeout=480)
    assert done["status"] == "completed", (done, stage_worker.tail())
    result = done["result"]
    # the 24 kHz audio reached the job resampled to 16 kHz: the same duration
    assert result["metadata"]["duration"] == pytest.approx(len(sample_pcm) / 32000, abs=0.1)
    assert [f["text"] for f in result["live"]["finals"]] == [c.transcript for c in completed]


def test_a_realtime_session_refuses_a_wrong_key_and_answers_what_it_cannot_serve_with_errors(
    live_shim: str, stream_worker: Proc
) -> None:
    from websockets.exceptions import InvalidStatus

    async def refused(client: Any, **kwargs: Any) -> Any:
        with pytest.raises(InvalidStatus) as no:
            async with client.realtime.connect(**kwargs) as conn:
                await conn.recv()
        return no.value.response

    async def session() -> list[Any]:
        answers = [await refused(_openai(live_shim, "not-a-key"), extra_query={"intent": "transcription"})]
        answers.append(await refused(_openai(live_shim), model="gpt-realtime"))  # a conversation session
        async with _openai(live_shim).realtime.connect(extra_query={"intent": "transcription"}) as conn:
            answers.append(await conn.recv())
            input_ = REALTIME_SESSION["audio"]["input"]  # type: ignore[index]
            prompt = {"transcription": {"model": "whisper-1", "prompt": "Diane, Sheila"}}
            for bad in ({"format": {"type": "audio/pcmu"}}, prompt, {"transcription": {"language": "xx"}}):
                await conn.session.update(session={"type": "transcription", "audio": {"input": bad}})
                answers.append(await conn.recv())
            await conn.send({"type": "response.create"})  # type: ignore[typeddict-item]
            answers.append(await conn.recv())
            await conn.input_audio_buffer.commit()  # nothing appended
            answers.append(await conn.recv())
            await conn.send({"type": "input_audio_buffer.append", "audio": "not base64!"})
            answers.append(await conn.recv())
            await conn.session.update(session={"type": "transcription", "audio": {"input": input_}})
            answers.append(await conn.recv())  # the session goes on
        return answers

    auth, conversation, created, pcmu, prompt, language, response, empty, garbage, updated = asyncio.run(
        asyncio.wait_for(session(), 120)
    )
    assert auth.status_code == 403 and json.loads(auth.body)["code"] == "FORBIDDEN", auth.body
    assert conversation.status_code == 422 and b"intent=transcription" in conversation.body
    assert created.type == "session.created"
    for error, param in (
        (pcmu, "session.audio.input.format"),
        (prompt, "session.audio.input.transcription.prompt"),
        (response, "type"),
    ):
        assert error.type == "error" and error.error.code == UnsupportedOptionError.code, error
        assert error.error.param == param and error.error.type == "invalid_request_error"
    assert language.type == "error" and language.error.code == UnsupportedOptionError.code, language
    assert empty.type == "error" and empty.error.code == "VALIDATION_ERROR", empty
    assert garbage.type == "error" and garbage.error.code == InvalidMediaError.code, garbage
    assert updated.type == "session.updated" and updated.session.audio.input.transcription.model == "gpt-4o-transcribe"
    r = redis.Redis.from_url(stream_worker.env["ECG_REDIS_URL"])
    wait_for(lambda: live.slot_counts(r) == (0, 1), 30, what="the session's slot given back")


def test_a_beta_realtime_session_closed_after_audio_without_commit_still_becomes_its_job(
    live_shim: str, stage_worker: Proc, stream_worker: Proc, sample_pcm: bytes
) -> None:
    """The beta client's dialect (``transcription_session.update``); a client that just closes the
    socket after its audio: what it sent is transcribed all the same and becomes the session's job."""
    import numpy as np
    import openai
    import soxr

    clip = sample_pcm[6 * 32000 : 10 * 32000]  # "Hello? Hello? Oh, hello. I didn't know you were there."
    pcm24 = soxr.resample(np.frombuffer(clip, dtype="<i2"), 16000, 24000).astype("<i2").tobytes()
    client = openai.AsyncOpenAI(
        base_url=live_shim + "/v1", websocket_base_url=_ws(live_shim) + "/v1", api_key=API_KEY, max_retries=0
    )

    async def session() -> tuple[Any, Any]:
        connect = client.beta.realtime.connect(model="gpt-4o-transcribe", extra_query={"intent": "transcription"})
        async with connect as conn:
            created = await conn.recv()
            await conn.transcription_session.update(
                session={"input_audio_format": "pcm16", "input_audio_transcription": {"language": "en"}}
            )
            updated = await conn.recv()
            for i in range(0, len(pcm24), 9600):
                await conn.input_audio_buffer.append(audio=base64.b64encode(pcm24[i : i + 9600]).decode())
        return created, updated

    created, updated = asyncio.run(asyncio.wait_for(session(), 60))
    assert created.type == "transcription_session.created", created
    assert updated.type == "transcription_session.updated" and updated.session.input_audio_format == "pcm16"
    assert updated.session.input_audio_transcription.language == "en"
    assert updated.session.input_audio_transcription.model == "gpt-4o-transcribe"  # the one named at connect
    job_id = updated.session.id  # the session's id: the job its recording becomes
    with httpx.Client(base_url=live_shim, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as api:
        wait_for(lambda: api.get(f"/jobs/{job_id}").status_code == 200, 60, what="the session's job")
        done = wait_job(api, job_id, timeout=300)
    assert done["status"] == "completed", (done, stage_worker.tail())
    assert done["result"]["metadata"]["duration"] == pytest.approx(4.0, abs=0.1)
    assert "hello" in " ".join(f["text"] for f in done["result"]["live"]["finals"]).lower()


def test_the_microphone_streams_until_ctrl_c_then_becomes_a_job(
    live_shim: str, stream_worker: Proc, sample_wav: Path
) -> None:
    """``ecg-audio stream --mic`` with ffmpeg's virtual input as the microphone: pyannote's sample
    played at real time in an endless loop (``amovie=...:loop=0``), so only Ctrl-C ends it. The
    page link first, finals with speakers as they come; at SIGINT the capture stops, the stream is
    finished, and the job id is printed (exit 0)."""
    r = redis.Redis.from_url(stream_worker.env["ECG_REDIS_URL"])
    wait_for(lambda: live.slot_counts(r) == (0, 1), 60, what="the slot of the previous test freed")
    env = stream_worker.env | {"ECG_SHIM_URL": live_shim, "ECG_API_KEY": API_KEY}
    cmd = [sys.executable, "-m", "ecg_cli", "stream", "--mic", "--mic-input", f"lavfi:amovie={sample_wav}:loop=0"]
    proc = subprocess.Popen(
        [*cmd, "--language", "en"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    try:
        wait_for(lambda: sum(x.startswith("[") for x in lines) >= 2 or proc.poll() is not None, 120, what="finals")
        assert proc.poll() is None, (lines, proc.stderr.read() if proc.stderr else "")
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    err = proc.stderr.read() if proc.stderr else ""
    assert rc == 0, (rc, lines, err)
    assert lines[0].startswith("live page: " + live_shim + "/jobs/live-"), lines[:2]
    assert "listening (Ctrl-C to stop)" in err and "stopping" in err
    assert lines[-1].startswith("job: live-"), lines[-3:]
    job_id = lines[-1].split()[-1]
    assert lines[0].startswith(f"live page: {live_shim}/jobs/{job_id}/view?token=")
    with httpx.Client(base_url=live_shim, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as api:
        assert api.get(f"/jobs/{job_id}").status_code == 200


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
