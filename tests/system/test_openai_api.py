"""The OpenAI-compatible endpoint, driven by the official ``openai`` client, on the real fleet.

pyannote's bundled sample call (two speakers) goes through ``POST /v1/audio/transcriptions``
as ``json``, ``srt`` and ``verbose_json``: each is an upload and a job on the session's real
worker. The verbose job's result and exports are then fetched from ``/jobs/{id}/…`` and parsed
by real parsers: ``srt`` for SubRip, ``webvtt-py`` for WebVTT, pyannote's RTTM loader.
``prompt`` reaches the decoder (a name is spelt as the prompt spells it). Options the server
cannot honour are refused by name, before any job exists.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import srt
import webvtt
from pyannote.database.util import load_rttm

from tests.conftest import API_KEY, GUEST_NAME, Proc, wait_for_worker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

# words of the sample's reference transcript (pyannote/audio/sample/sample.stm)
EXPECTED_WORDS = ("hello", "know", "there")


@pytest.fixture(scope="module")
def client(shim: str, api: httpx.Client, worker: Proc) -> openai.OpenAI:
    wait_for_worker(api, worker)
    # no retries: a retried request would be a second job
    return openai.OpenAI(api_key=API_KEY, base_url=shim + "/v1", max_retries=0, timeout=900)


def _transcribe(client: openai.OpenAI, sample_wav: Path, **kwargs: Any) -> Any:
    with open(sample_wav, "rb") as fh:
        return client.audio.transcriptions.with_raw_response.create(file=fh, model="whisper-1", **kwargs)


def test_json_and_srt(client: openai.OpenAI, sample_wav: Path) -> None:
    raw = _transcribe(client, sample_wav, response_format="json")
    text = raw.parse().text.lower()
    assert all(w in text for w in EXPECTED_WORDS), text
    assert raw.headers["x-ecg-job-id"].startswith("oai-")
    subtitles = _transcribe(client, sample_wav, response_format="srt").parse()
    cues = list(srt.parse(subtitles))
    assert cues and all(c.end > c.start for c in cues)
    speakers = {c.content.split("]")[0].lstrip("[") for c in cues if c.content.startswith("[SPEAKER_")}
    assert len(speakers) >= 2, subtitles
    # laid out as the job's exports are: two lines of at most 42 characters (the speaker's label aside)
    lines = [ln.split("] ", 1)[-1] if i == 0 else ln for c in cues for i, ln in enumerate(c.content.splitlines())]
    assert all(len(ln) <= 42 for ln in lines) and all(c.content.count("\n") <= 1 for c in cues), subtitles


def test_verbose_json_has_speakers_and_the_job_exports_parse(
    client: openai.OpenAI, api: httpx.Client, sample_wav: Path
) -> None:
    raw = _transcribe(client, sample_wav, response_format="verbose_json", timestamp_granularities=["segment", "word"])
    verbose = raw.parse()
    body = raw.http_response.json()
    assert verbose.duration == pytest.approx(30.0, abs=1.0) and verbose.language == "en"
    assert all(w in verbose.text.lower() for w in EXPECTED_WORDS)
    speakers = {s["speaker"] for s in body["segments"]} - {None}
    assert len(speakers) >= 2, body["segments"]
    assert body["words"] and all(w["start"] <= w["end"] for w in body["words"])
    assert [s.text for s in verbose.segments or []] == [s["text"] for s in body["segments"]]

    job_id = raw.headers["x-ecg-job-id"]
    result = api.get(f"/jobs/{job_id}/result")
    assert result.status_code == 200 and result.headers["content-type"].startswith("application/json")
    assert set(result.json()["speakers"]) == speakers

    def export(fmt: str, media_type: str) -> str:
        r = api.get(f"/jobs/{job_id}/exports/{fmt}")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].split(";")[0] == media_type, r.headers
        assert r.headers["content-disposition"] == f'attachment; filename="{job_id}.{fmt}"'
        return r.text

    cues = list(srt.parse(export("srt", "application/x-subrip")))
    # every word of every segment, in order, laid out as subtitles (pipeline/exports.py: a long
    # segment is several cues, of at most two lines)
    spoken = [c.content.split("] ", 1)[-1].replace("\n", " ") for c in cues]
    assert " ".join(spoken) == " ".join(s["text"] for s in body["segments"])
    assert len(cues) >= len(body["segments"]) and all(c.content.count("\n") <= 1 for c in cues)
    vtt = webvtt.from_buffer(io.StringIO(export("vtt", "text/vtt")))
    assert len(vtt.captions) == len(cues) and {c.voice for c in vtt.captions} == speakers
    rttm = export("rttm", "text/plain")
    annotations = load_rttm(io.StringIO(rttm))
    (annotation,) = annotations.values()
    assert set(annotation.labels()) == speakers and len(list(annotation.itertracks())) == len(rttm.splitlines())
    txt = export("txt", "text/plain")
    assert len(txt.splitlines()) == len(body["segments"]) and all(line.startswith("[00:") for line in txt.splitlines())


def test_prompt_reaches_the_decoder(client: openai.OpenAI, guest_name_wav: Path) -> None:
    """OpenAI's ``prompt`` is the job's options.prompt: the name it spells is the one decoded."""
    first = GUEST_NAME.split()[0]
    plain = _transcribe(client, guest_name_wav, response_format="json").parse().text
    prompted = _transcribe(client, guest_name_wav, response_format="json", prompt=f"{GUEST_NAME}.").parse().text
    assert first not in plain and prompted.count(first) == 2, (plain, prompted)


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"prompt": "Diane and Sheila. " * 60}, "at most 1000 characters"),
        ({"model": "gpt-4o-transcribe"}, "is not served here"),
        ({"temperature": 0.2}, "temperature is not supported"),
        ({"response_format": "json", "timestamp_granularities": ["word"]}, "needs response_format=verbose_json"),
    ],
    ids=["prompt too long", "unknown model", "temperature", "granularity without verbose_json"],
)
def test_options_it_cannot_honour_are_refused(
    client: openai.OpenAI, api: httpx.Client, sample_wav: Path, kwargs: dict[str, Any], phrase: str
) -> None:
    before = api.get("/jobs", params={"limit": 1}).json()["jobs"]
    with pytest.raises(openai.BadRequestError) as refused:
        with open(sample_wav, "rb") as fh:
            client.audio.transcriptions.create(file=fh, **{"model": "whisper-1", **kwargs})
    assert refused.value.status_code == 400 and refused.value.code == "UNSUPPORTED_OPTION"
    assert phrase in refused.value.message + str(refused.value.body), refused.value.body
    assert api.get("/jobs", params={"limit": 1}).json()["jobs"] == before, "a refused request made a job"
