"""The job page and the event stream on a real job: a worker runs pyannote's sample call.

Headless Chromium (found as tests/system/test_flower.py finds it) is driven over the Chrome DevTools
protocol: it opens the job's ``view_url`` while the job runs and reads the page's DOM as the
events arrive (progress must advance), then after completion (one timeline lane per speaker,
every segment's text). Screenshots: var/test-artifacts/job-page-running.png and job-page-done.png.

The SSE test connects mid-job, hangs up, reconnects with Last-Event-ID, and must have received
every event of the job once, in order, with the final one; the ids are the callbacks' ids.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from websockets.sync.client import ClientConnection, connect

from ecg_audio import event_log
from tests.api_shim.test_live_events import client, live_shim, read_sse  # noqa: F401 - fixtures used here
from tests.conftest import REPO, Proc, Receiver, free_port, wait_for_worker, wait_job
from tests.helpers import wait_for
from tests.system.test_flower import chromium

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ARTIFACTS = REPO / "var" / "test-artifacts"


class Chrome:
    """Headless Chromium with one page, driven over the DevTools protocol (a WebSocket)."""

    def __init__(self, exe: str, tmp: Path) -> None:
        port = free_port()
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / ('chrome-' + uuid.uuid4().hex[:6])}", f"--remote-debugging-port={port}",
             "--remote-allow-origins=*", "--window-size=1400,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def page_socket() -> str | None:
            if self.proc.poll() is not None:
                raise RuntimeError("Chromium exited before opening its DevTools port")
            try:
                pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
            except (httpx.HTTPError, ValueError):
                return None
            return next((p["webSocketDebuggerUrl"] for p in pages if p.get("type") == "page"), None)

        ws_url = wait_for(page_socket, 120, interval=0.3, what="Chromium's DevTools port")
        self.ws: ClientConnection = connect(ws_url, max_size=None, open_timeout=30)
        self.ids = itertools.count(1)
        self.console: list[str] = []
        self.call("Runtime.enable")
        self.call("Page.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("method") == "Runtime.exceptionThrown":
                self.console.append(json.dumps(msg["params"])[:500])
            if msg.get("id") == n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})  # type: ignore[no-any-return]

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def js(self, expression: str) -> Any:
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return reply.get("result", {}).get("value")

    def screenshot(self, path: Path) -> None:
        """The whole page, not just the window."""
        height = int(self.js("Math.ceil(document.documentElement.scrollHeight)") or 1000)
        self.call("Emulation.setDeviceMetricsOverride", width=1400, height=max(height, 600), deviceScaleFactor=1,
                  mobile=False)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        self.call("Emulation.clearDeviceMetricsOverride")

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture()
def chrome(tmp_path: Path) -> Iterator[Chrome]:
    c = Chrome(chromium(), tmp_path)
    yield c
    c.close()


PAGE_STATE = """JSON.stringify({
  status: document.body.dataset.status || null,
  rendered: document.body.dataset.rendered === "true",
  progress: Number((document.getElementById("progress") || {}).textContent || -1),
  milestones: Array.from(document.querySelectorAll("#milestones li")).map(li => Number(li.dataset.progress)),
  lanes: Array.from(document.querySelectorAll("#timeline svg g.lane")).map(g => g.dataset.speaker),
  turns: document.querySelectorAll("#timeline svg rect.turn").length,
  segments: Array.from(document.querySelectorAll("#transcript li.segment")).map(li => ({
    speaker: li.dataset.speaker, text: li.querySelector(".text").textContent})),
  talk: Array.from(document.querySelectorAll("#talk-time tr.talk")).map(tr => tr.dataset.speaker),
  downloads: Array.from(document.querySelectorAll("#downloads a")).map(a => a.getAttribute("href")),
})"""


def upload(api: httpx.Client, wav: Path) -> str:
    return str(api.post("/api/uploads", content=wav.read_bytes()).json()["video_url"])


def test_job_page_shows_live_progress_then_who_said_what(
    client: httpx.Client,  # noqa: F811
    live_shim: str,  # noqa: F811
    worker: Proc,
    sample_wav: Path,
    chrome: Chrome,
) -> None:
    wait_for_worker(client, worker)
    job_id = f"page-{uuid.uuid4().hex[:8]}"
    video_url = upload(client, sample_wav)
    accepted = client.post("/api/upload-video/process-video", json={"job_id": job_id, "video_url": video_url})
    assert accepted.status_code == 202
    view_url = client.get(f"/jobs/{job_id}").json()["view_url"]
    assert re.fullmatch(rf"https?://[^/]+/jobs/{job_id}/view\?token=\d+\.[A-Za-z0-9_-]+", view_url), view_url
    chrome.open(view_url)  # the page needs no API key: the token is the key

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    running_png = ARTIFACTS / "job-page-running.png"
    running_png.unlink(missing_ok=True)
    seen: list[int] = []
    shot2 = False
    state: dict[str, Any] = {}

    def watch_page() -> bool:
        """Record each progress the page shows; done once it has rendered the result."""
        nonlocal state, shot2
        state = json.loads(chrome.js(PAGE_STATE) or "{}")
        if state.get("progress", -1) >= 0 and (not seen or state["progress"] != seen[-1]):
            seen.append(state["progress"])
        running_now = state.get("status") == "processing" and 0 < state["progress"] < 100
        # a first screenshot as soon as the job runs, a later one once progress has moved on
        if running_now and (not running_png.exists() or (len({p for p in seen if 0 < p < 100}) >= 2 and not shot2)):
            shot2 = running_png.exists()
            chrome.screenshot(running_png)
        return bool(state.get("rendered"))

    wait_for(watch_page, 600, interval=0.2, what=lambda: (
        f"the page never showed the result: {state} {chrome.console}\njob: {client.get(f'/jobs/{job_id}').text[:500]}"
        f"\nworker:\n{worker.tail(40)}"
    ))
    assert running_png.exists(), f"no screenshot while running; progress seen: {seen}"
    running = [p for p in seen if 0 < p < 100]
    assert len(set(running)) >= 2, f"progress did not advance on the page while the job ran: {seen}"
    assert seen == sorted(seen) and seen[-1] == 100, seen
    # the milestones came from the event stream, in order, the final one last
    assert state["milestones"] == sorted(state["milestones"]) and state["milestones"][-1] == 100

    status = wait_job(client, job_id)
    assert status["status"] == "completed"
    result = status["result"]

    # after completion, a fresh load of the same link (the old document is marked, to tell them apart)
    chrome.js("document.body.dataset.stale = 'true'")
    chrome.open(view_url)
    def fresh_and_rendered() -> bool:
        nonlocal state
        fresh = chrome.js("document.body && document.body.dataset.stale !== 'true'")
        state = json.loads(chrome.js(PAGE_STATE) or "{}")
        return bool(fresh and state.get("rendered"))

    wait_for(fresh_and_rendered, 120, interval=0.2, what=lambda: f"a fresh load of the page rendered: {state}")
    done_png = ARTIFACTS / "job-page-done.png"
    chrome.screenshot(done_png)
    speakers = sorted(result["speakers"])
    assert len(speakers) >= 2
    assert state["lanes"] == speakers, "one timeline lane per speaker"
    assert state["turns"] == len(result["diarization"])
    assert sorted(state["talk"]) == speakers
    assert [s["text"] for s in state["segments"]] == [s["text"].strip() for s in result["segments"]]
    assert [s["speaker"] for s in state["segments"]] == [s["speaker"] for s in result["segments"]]
    for png in (running_png, done_png):
        assert png.stat().st_size > 10_000

    # the download links work with the page's token alone
    assert len(state["downloads"]) == 4
    base = view_url.split("?")[0].rsplit("/", 1)[0] + "/"
    with httpx.Client(timeout=30) as anon:
        for href in state["downloads"]:
            resp = anon.get(base + href)
            assert resp.status_code == 200, (href, resp.text[:200])
            assert "attachment" in resp.headers["content-disposition"]
        vtt = anon.get(base + next(h for h in state["downloads"] if "/vtt" in h)).text
        assert vtt.startswith("WEBVTT") and result["segments"][0]["text"].strip() in vtt


def test_sse_client_reconnecting_mid_job_gets_every_event_once(
    client: httpx.Client,  # noqa: F811
    worker: Proc,
    receiver: Receiver,
    sample_wav: Path,
    redis_url: str,
) -> None:
    wait_for_worker(client, worker)
    job_id = f"sse-job-{uuid.uuid4().hex[:8]}"
    body = {"job_id": job_id, "video_url": upload(client, sample_wav), "callback_url": receiver.url()}
    assert client.post("/api/upload-video/process-video", json=body).status_code == 202
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    wait_for(lambda: event_log.read_all(r, job_id), 600, interval=0.2, what="the job's first milestone")
    first = read_sse(client, f"/jobs/{job_id}/events", stop_after=1)
    assert len(first.ids) == 1
    # away while at least one more milestone happens
    def moved_on() -> bool:
        return len(event_log.read_all(r, job_id)) >= 3 or client.get(f"/jobs/{job_id}").json()["status"] == "completed"

    wait_for(moved_on, 600, interval=0.2, what="two more milestones (or the end)")
    second = read_sse(client, f"/jobs/{job_id}/events", headers={"Last-Event-ID": first.ids[-1]})
    assert second.ended
    got = first.events + second.events
    ids = [i for i, _ in got]
    logged = [e.event_id for e in event_log.read_all(r, job_id)]
    assert ids == logged and len(set(ids)) == len(ids), "every event once, in order"
    assert ids[-1] == f"{job_id}:final:1" and got[-1][1]["status"] == "completed" and got[-1][1]["result"]
    progress = [e["progress"] for _, e in got]
    assert progress == sorted(progress) and len(set(progress)) >= 5, progress  # the milestones, 10 ... 100
    # the same ids the backend's callbacks carry
    wait_for(lambda: len(receiver.for_job(job_id)) >= len(ids), 120, interval=0.2, what="every callback delivered")
    assert [e["event_id"] for e in receiver.for_job(job_id)] == ids


def test_job_page_renders_korean_text(client: httpx.Client, redis_url: str, chrome: Chrome) -> None:  # noqa: F811
    """UTF-8 all the way: Korean segment text from the stored result reaches the DOM unchanged, the
    document's language follows the result's, and the downloads carry the same text."""
    from ecg_audio.jobs import JobStore

    store = JobStore(redis.Redis.from_url(redis_url, decode_responses=True), 3600)
    job_id = f"ko-{uuid.uuid4().hex[:8]}"
    store.create(job_id, {"job_id": job_id, "video_url": "s3://bucket/none.wav", "language": "ko"})
    lines = [("SPEAKER_00", "안녕하세요, 회의를 시작하겠습니다."), ("SPEAKER_01", "네, 좋습니다. 자료는 보셨나요?")]
    segments = [
        {"id": i, "start": 2.0 * i, "end": 2.0 * i + 1.8, "speaker": spk, "text": text, "words": []}
        for i, (spk, text) in enumerate(lines)
    ]
    result = {
        "segments": segments,
        "diarization": [{"start": s["start"], "end": s["end"], "speaker": s["speaker"]} for s in segments],
        "speakers": {spk: {"total_duration": 1.8, "segment_count": 1, "word_count": 3} for spk, _ in lines},
        "metadata": {"duration": 4.0, "language": "ko"},
    }
    store.set_result(job_id, {"job_id": job_id, "result": result})
    store.update(job_id, status="completed", progress=100, stage="merge", message="Done")
    view_url = client.get(f"/jobs/{job_id}").json()["view_url"]
    chrome.open(view_url)
    state: dict[str, Any] = wait_for(
        lambda: (s := json.loads(chrome.js(PAGE_STATE) or "{}")).get("rendered") and s, 120, interval=0.2,
        what="the page rendered",
    )
    assert [s["text"] for s in state["segments"]] == [text for _, text in lines]
    assert state["lanes"] == ["SPEAKER_00", "SPEAKER_01"]
    assert chrome.js("document.getElementById('transcript').lang") == "ko"  # the transcript's language
    assert chrome.js("document.documentElement.lang") == "en"  # the page's: the job named no locale
    assert chrome.js("document.characterSet") == "UTF-8"
    base = view_url.split("?")[0].rsplit("/", 1)[0] + "/"
    txt = httpx.get(base + next(h for h in state["downloads"] if "/txt" in h), timeout=30)
    assert txt.headers["content-type"] == "text/plain; charset=utf-8"
    assert all(text in txt.text for _, text in lines)


PAGE_WORDS = """JSON.stringify({
  lang: document.documentElement.lang,
  title: document.title,
  h1: document.querySelector("h1").textContent,
  job: document.querySelector("p.job").firstChild.textContent.trim(),
  headings: Array.from(document.querySelectorAll("h2")).map(h => h.textContent),
  columns: Array.from(document.querySelectorAll("#talk-time th")).map(th => th.textContent),
  downloads: Array.from(document.querySelectorAll("#downloads a")).map(a => a.textContent),
  status: document.getElementById("status").textContent,
  talk: Array.from(document.querySelectorAll("#talk-time td.talk-seconds")).map(td => td.textContent),
  rendered: document.body.dataset.rendered === "true",
})"""


def _stored_job(redis_url: str, locale: str | None) -> str:
    from ecg_audio.jobs import JobStore

    store = JobStore(redis.Redis.from_url(redis_url, decode_responses=True), 3600)
    job_id = f"loc-{locale}-{uuid.uuid4().hex[:8]}"
    options = {"locale": locale} if locale else {}
    store.create(job_id, {"job_id": job_id, "video_url": "s3://bucket/none.wav", "options": options})
    texts = ("안녕하세요.", "네, 반갑습니다.") if locale == "ko" else ("Hello.", "Hi there.")
    segments = [
        {"id": 0, "start": 0.0, "end": 1.5, "speaker": "SPEAKER_00", "text": texts[0], "words": []},
        {"id": 1, "start": 2.0, "end": 75.0, "speaker": "SPEAKER_01", "text": texts[1], "words": []},
    ]
    result = {
        "segments": segments,
        "diarization": [{"start": s["start"], "end": s["end"], "speaker": s["speaker"]} for s in segments],
        "speakers": {
            "SPEAKER_00": {"total_duration": 1.5, "segment_count": 1, "word_count": 1},
            "SPEAKER_01": {"total_duration": 73.0, "segment_count": 1, "word_count": 2},
        },
        "metadata": {"duration": 75.0, "language": "ko" if locale == "ko" else "en"},
    }
    store.set_result(job_id, {"job_id": job_id, "result": result})
    store.update(job_id, status="completed", progress=100, stage="merge", message="Done")
    return job_id


def _page_words(chrome: Chrome, view_url: str) -> dict[str, Any]:
    chrome.open(view_url)
    seen: dict[str, Any] = {}

    def rendered() -> bool:
        seen.update(json.loads(chrome.js(PAGE_WORDS) or "{}"))
        return bool(seen.get("rendered"))

    wait_for(rendered, 60, interval=0.2, what=lambda: f"the page's words: {seen}")
    return seen


def test_job_page_speaks_the_jobs_locale(client: httpx.Client, redis_url: str, chrome: Chrome) -> None:  # noqa: F811
    """options.locale "ko": title, headings, table, buttons, status and durations in Korean (the
    screenshot var/test-artifacts/job-page-ko.png shows it); "en" or none: English."""
    ko_id = _stored_job(redis_url, "ko")
    ko = _page_words(chrome, client.get(f"/jobs/{ko_id}").json()["view_url"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    chrome.screenshot(ARTIFACTS / "job-page-ko.png")
    assert ko["lang"] == "ko"
    assert ko["title"] == f"{ko_id} — ECG 오디오 분석기" and ko["job"] == "작업"
    assert ko["h1"] == "누가 언제 무엇을 말했나"
    assert ko["headings"] == ["시간대별 화자", "발화 시간", "다운로드", "녹취록"]
    assert ko["columns"] == ["화자", "발화 시간", "비율", "구간 수", "단어 수"]
    assert ko["downloads"] == ["SRT 자막", "WebVTT 자막", "RTTM (화자 구간)", "텍스트"]
    assert ko["status"] == "완료" and sorted(ko["talk"]) == ["1.5초", "1분 13초"]
    en_id = _stored_job(redis_url, None)
    en = _page_words(chrome, client.get(f"/jobs/{en_id}").json()["view_url"])
    assert en["lang"] == "en" and en["title"] == f"{en_id} — ECG Audio Analyzer" and en["h1"] == "Who said what, when"
    assert en["headings"] == ["Speakers over time", "Talk time", "Downloads", "Transcript"]
    assert en["downloads"] == ["SRT subtitles", "WebVTT", "RTTM (speakers)", "Plain text"]
    assert en["status"] == "completed" and sorted(en["talk"]) == ["1 min 13 s", "1.5 s"]
    assert not chrome.console, chrome.console  # no script error (the page's words are a JSON data block)
    # the HTML itself is in the locale before any script runs
    html = httpx.get(client.get(f"/jobs/{ko_id}").json()["view_url"], timeout=30).text
    assert '<html lang="ko">' in html and "<h2>녹취록</h2>" in html and "{{" not in html
