"""Bilingual recordings end to end: every stretch of speech gets words, in its own language.

Each file is cut from pyannote's English sample call (2 voices) and ../shared's real Korean
interview korean_conv_24s, joined so that the language changes inside one of WhisperX's
30 s speech chunks, at different places in it: English then Korean, a short English part
then Korean, Korean then English, Korean-English-Korean. Each runs the whole pipeline in
this process once (the models load once for the module); the assertions read that one result:

- speech_coverage >= 0.95 of the diarized speech;
- every segment mostly inside one part (IN_PART of its time) is in that part's language, in
  its script, and those segments span at least half of the part;
- the speakers: the sample's two voices plus the Korean clip's own count, measured on the
  clip alone by the same pipeline (an expected failure for now: see the test).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pipeline.coverage import total, union

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

IN_PART = 0.75  # a segment with this share of its time inside a part must be in the part's language
MIN_COVERAGE = 0.95
SAMPLE_SPEAKERS = 2  # pyannote's sample call: Diane and Sheila (sample.rttm)

# (source, from s, to s) in order: "en" is the sample, "ko" korean_conv_24s
CASES: dict[str, list[tuple[str, float, float]]] = {
    "en_then_ko": [("en", 0.0, 30.0), ("ko", 0.0, 24.5)],
    "short_en_then_ko": [("en", 0.0, 18.0), ("ko", 0.0, 24.5)],
    "ko_then_en": [("ko", 0.0, 24.5), ("en", 6.0, 30.0)],
    "ko_en_ko": [("ko", 0.0, 12.3), ("en", 6.0, 24.0), ("ko", 12.3, 24.5)],
}


def has_hangul(text: str) -> bool:
    return any("\uac00" <= c <= "\ud7a3" for c in text)


def has_latin(text: str) -> bool:
    return any("a" <= c.lower() <= "z" for c in text)


@pytest.fixture(scope="module")
def registry() -> Any:
    from ecg_audio.settings import get_settings
    from worker.models import ModelRegistry

    r = ModelRegistry(get_settings())
    r.preload()
    return r


@pytest.fixture(scope="module")
def sources(shared_dir: Path, sample_wav: Path) -> dict[str, Path]:
    korean = shared_dir / "audio" / "korean_conv_24s.wav"
    if not korean.is_file():
        pytest.skip(f"{korean} is absent: the bilingual tests need ../shared's korean_conv_24s.wav")
    return {"en": sample_wav, "ko": korean}


def _join(ffmpeg: str, sources: dict[str, Path], parts: list[tuple[str, float, float]], out: Path) -> Path:
    args: list[str] = []
    for src, a, b in parts:
        args += ["-ss", f"{a:.3f}", "-t", f"{b - a:.3f}", "-i", str(sources[src])]
    n = len(parts)
    graph = "".join(f"[{i}:a]aresample=16000,aformat=channel_layouts=mono[a{i}];" for i in range(n))
    graph += "".join(f"[a{i}]" for i in range(n)) + f"concat=n={n}:v=0:a=1"
    cmd = [ffmpeg, "-hide_banner", "-loglevel", "error", "-y", *args, "-filter_complex", graph, "-ac", "1", str(out)]
    subprocess.run(cmd, check=True)
    return out


def _analyze(path: Path, registry: Any) -> dict[str, Any]:
    from ecg_cli.runner import analyze

    result: dict[str, Any] = analyze(str(path), registry=registry)["result"]
    return result


@pytest.fixture(scope="module")
def korean_speakers(registry: Any, sources: dict[str, Path]) -> int:
    """The Korean clip's own speaker count, as the pipeline finds it on the clip alone."""
    n = int(_analyze(sources["ko"], registry)["metadata"]["speakers_detected"])
    print(f"korean_conv_24s alone: {n} speakers")
    return n


@pytest.fixture(scope="module")
def results(
    registry: Any, sources: dict[str, Path], ffmpeg: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("bilingual")
    out = {
        name: _analyze(_join(ffmpeg, sources, parts, folder / f"{name}.wav"), registry) for name, parts in CASES.items()
    }
    worst = min(out, key=lambda k: out[k]["metadata"]["speech_coverage"] or 0.0)
    summary = {
        k: {
            "speech_coverage": r["metadata"]["speech_coverage"],
            "speakers": r["metadata"]["speakers_detected"],
            "languages": r["metadata"]["languages"],
            "gaps": r["metadata"]["gaps"],
            "second_pass": r["metadata"]["second_pass"],
        }
        for k, r in out.items()
    }
    print("bilingual results:", json.dumps(summary, ensure_ascii=False))
    print(f"worst case: {worst}: {json.dumps(summary[worst], ensure_ascii=False)}")
    return out


def _parts(name: str) -> list[tuple[str, float, float]]:
    """(language, start, end) of each part in the joined file's time."""
    t, out = 0.0, []
    for src, a, b in CASES[name]:
        out.append((src, t, t + (b - a)))
        t += b - a
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_every_stretch_of_speech_has_words(results: dict[str, dict[str, Any]], name: str) -> None:
    md = results[name]["metadata"]
    assert md["speech_coverage"] >= MIN_COVERAGE, (md["speech_coverage"], md["gaps"], md["notes"])
    assert not any(n.startswith("low speech coverage") for n in md["notes"]), md["notes"]


@pytest.mark.parametrize("name", list(CASES))
def test_each_part_is_in_its_language(results: dict[str, dict[str, Any]], name: str) -> None:
    segments = results[name]["segments"]
    for lang, start, end in _parts(name):
        # a segment mostly (IN_PART) inside the part; one that straddles a switch may be either
        inside = [s for s in segments if _share(s, start, end) >= IN_PART]
        assert inside, (lang, start, end, [(s["start"], s["end"], s["language"]) for s in segments])
        wrong = [(s["start"], s["end"], s["language"], s["text"]) for s in inside if s["language"] != lang]
        assert not wrong, (lang, start, end, wrong)
        text = " ".join(s["text"] for s in inside)
        assert has_hangul(text) if lang == "ko" else has_latin(text) and not has_hangul(text), (lang, text)
        # the part is there, not a word of it: its segments span most of its diarized speech
        turns = [(max(start, t["start"]), min(end, t["end"])) for t in results[name]["diarization"]]
        speech = total(union((a, b) for a, b in turns if b > a))
        spoken = sum(s["end"] - s["start"] for s in inside)
        assert spoken >= 0.7 * speech, (lang, start, end, spoken, speech)
    assert set(results[name]["metadata"]["languages"]) == {"en", "ko"}


def _share(segment: dict[str, Any], start: float, end: float) -> float:
    length = max(1e-3, segment["end"] - segment["start"])
    return max(0.0, min(end, segment["end"]) - max(start, segment["start"])) / length


# Known defect, kept visible: the diarization (pipeline/diarize) clusters the voices of two joined
# recordings wrongly, whatever the transcription does (it runs first). Measured on this suite's
# four files: 5, 6, 3 and 6 speakers for 4 voices (each recording alone: 2 and 2).
@pytest.mark.xfail(
    reason="diarization merges or splits voices across two joined recordings (3-6 labels for 4 voices): "
    "open, outside the transcription; an XPASS means it was fixed",
    strict=False,
)
@pytest.mark.parametrize("name", list(CASES))
def test_speaker_count_stays_right_across_the_switch(
    results: dict[str, dict[str, Any]], korean_speakers: int, name: str
) -> None:
    md = results[name]["metadata"]
    assert md["speakers_detected"] == SAMPLE_SPEAKERS + korean_speakers, (md["speakers_detected"], name)
