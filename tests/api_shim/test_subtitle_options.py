"""options.subtitles through the shim: checked at submission like the other options (422 with the
field named), kept with the job, and applied by every rendering of the exports (the job's export
route here; the worker writes its files with the same pipeline.exports)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

PROCESS = "/api/upload-video/process-video"
KEY = "subtitle-key-0123456789"


@pytest.fixture
def api(redis_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    from api_shim.app import create_app
    from ecg_audio.settings import Settings

    url = redis_url.rsplit("/", 1)[0] + "/11"  # no worker listens here: accepted jobs stay queued
    redis.Redis.from_url(url).flushdb()
    app = create_app(
        Settings(api_keys=[KEY], redis_url=url, workspace_root=tmp_path / "ws", output_root=tmp_path / "o")
    )
    yield TestClient(app, headers={"Authorization": f"Bearer {KEY}"}), url
    redis.Redis.from_url(url).flushdb()


def _post(client: TestClient, subtitles: Any) -> Any:
    job_id = f"sub-{uuid.uuid4().hex[:8]}"
    body = {"job_id": job_id, "video_url": "upload://" + uuid.uuid4().hex, "options": {"subtitles": subtitles}}
    return job_id, client.post(PROCESS, json=body)


@pytest.mark.parametrize(
    "bad", [{"max_lines": 0}, {"max_lines": 5}, {"max_chars_per_line": 3}, {"max_cue_s": 0.5}, {"font": "Arial"}, 7]
)
def test_a_bad_layout_is_refused_naming_the_field(api: tuple[TestClient, str], bad: Any) -> None:
    client, _ = api
    _, r = _post(client, bad)
    assert r.status_code == 422, r.text
    assert "subtitles" in r.text


def test_the_jobs_layout_shapes_its_exports(api: tuple[TestClient, str]) -> None:
    from ecg_audio.jobs import JobStore

    client, url = api
    job_id, r = _post(client, {"max_chars_per_line": 20, "max_lines": 1, "max_cue_s": 3})
    assert r.status_code == 202, r.text
    store = JobStore(redis.Redis.from_url(url, decode_responses=True), 3600)
    rec = store.get(job_id)
    assert rec is not None
    layout = rec.request["options"]["subtitles"]
    assert layout == {"max_chars_per_line": 20, "max_lines": 1, "max_cue_s": 3.0}
    words, t = [], 0.0
    for w in "So I don't really mind it, but my brother thinks the accent gives him away every time.".split():
        words.append({"word": w, "start": t, "end": t + 0.3, "speaker": "SPEAKER_00"})
        t += 0.35
    segment = {
        "id": 0,
        "start": 0.0,
        "end": t,
        "speaker": "SPEAKER_00",
        "language": "en",
        "words": words,
        "text": " ".join(w["word"] for w in words),
    }
    # the worker's merge stage keeps the job's layout in the result (tasks.stages._merge)
    result = {"segments": [segment], "diarization": [], "speakers": {}, "metadata": {"subtitles": layout}}
    store.set_result(job_id, {"job_id": job_id, "result": result})
    store.update(job_id, status="completed", progress=100, stage="merge", message="Done")
    srt = client.get(f"/jobs/{job_id}/exports/srt")
    assert srt.status_code == 200
    blocks = [b.splitlines() for b in srt.text.strip().split("\n\n")]
    assert len(blocks) >= 4
    for block in blocks:
        assert len(block) == 3, block  # number, times, one line
        assert len(block[2].removeprefix("[SPEAKER_00] ")) <= 20, block
    vtt = client.get(f"/jobs/{job_id}/exports/vtt").text
    assert vtt.count(" --> ") == len(blocks)
