"""The per-language pieces of the pipeline that need no model: each language sent to its aligner,
segments that keep their language and subtitle cues for Korean/Japanese/Chinese, the joined
embedded model, the Hangul timeline. The language rule and the message catalog (ecg_audio) are in
tests/ecg_audio/test_languages.py."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.align import align_by_language
from pipeline.exports import to_srt, to_vtt
from pipeline.merge import WordOut, build_segments
from pipeline.speech_types import AlignedSegment, Alignment, AsrSegment, Transcript, Word

# --- word times per language ----------------------------------------------------------


def test_align_by_language_sends_each_language_to_its_method() -> None:
    segs = [
        AsrSegment(0.0, 2.0, "hello there", language="en", words=[{"word": "hello", "start": 0.0, "end": 1.0}]),
        AsrSegment(3.0, 5.0, "안녕하세요", language="ko"),
        AsrSegment(6.0, 7.0, "bye", language="en"),
    ]
    transcript = Transcript(segments=segs, language="en")
    calls: list[tuple[str, list[str]]] = []

    def aligner_for(language: str) -> tuple[Any, str] | None:
        return ("model", "ko-aligner") if language == "ko" else None

    def whisper_words(part: Transcript) -> Alignment:
        calls.append(("whisper", [s.text for s in part.segments]))
        return Alignment([AlignedSegment(s.start, s.end, s.text, [], s.language) for s in part.segments], "whisper")

    def wav2vec2_words(part: Transcript, aligner: tuple[Any, str]) -> Alignment:
        calls.append(("wav2vec2", [s.text for s in part.segments]))
        assert aligner == ("model", "ko-aligner") and part.language == "ko"
        words = [Word("안녕하세요", 3.1, 4.0)]
        return Alignment([AlignedSegment(3.0, 5.0, "안녕하세요", words, "ko")], "wav2vec2", "ko-aligner")

    out = align_by_language(transcript, aligner_for, whisper_words, wav2vec2_words)
    assert calls == [("whisper", ["hello there", "bye"]), ("wav2vec2", ["안녕하세요"])]
    assert [s.text for s in out.segments] == ["hello there", "안녕하세요", "bye"]  # back in time order
    assert [s.language for s in out.segments] == ["en", "ko", "en"]
    assert out.method == "whisper+wav2vec2" and out.model == "ko-aligner"
    # no aligner anywhere: Whisper's words only
    only = align_by_language(transcript, lambda lang: None, whisper_words, wav2vec2_words)
    assert only.method == "whisper" and only.model is None


# --- segments and subtitles -----------------------------------------------------------


def _words(texts: list[str], start: float = 0.0, step: float = 0.5) -> list[WordOut]:
    return [WordOut(t, start + i * step, start + (i + 1) * step, "SPEAKER_00", 0.9) for i, t in enumerate(texts)]


def test_segments_split_at_a_language_change_and_unspaced_words_join() -> None:
    words = _words(["hello", "there", "안녕하세요", "반갑습니다", "今", "日", "は"])
    segs = build_segments(words, ["en", "en", "ko", "ko", "ja", "ja", "ja"])
    assert [(s.language, s.text) for s in segs] == [
        ("en", "hello there"),
        ("ko", "안녕하세요 반갑습니다"),
        ("ja", "今日は"),
    ]


def test_korean_subtitles_are_cut_at_spaces_and_duration() -> None:
    # (the layout of every language: tests/pipeline/test_exports.py)
    words = _words(["저", "개인적인", "질문인데요.", "웃으시니까", "입발에", "투스", "재미라고", "하는", "건가요?"])
    seg = build_segments(words, ["ko"] * len(words))[0].to_dict()
    srt = to_srt([seg])
    cues = [block.splitlines()[2:] for block in srt.strip().split("\n\n")]
    assert len(cues) >= 2
    lines = [line.removeprefix("[SPEAKER_00] ") for cue in cues for line in cue]
    assert all(len(cue) <= 2 for cue in cues) and all(len(line) <= 16 for line in lines), cues
    assert " ".join(lines) == seg["text"]  # broken at spaces only
    # a long monologue: no cue lasts more than 7 s
    long_words = _words(["네"] * 40, step=1.0)
    long_seg = build_segments(long_words, ["ko"] * 40)[0].to_dict()
    vtt = to_vtt([long_seg])
    assert vtt.encode("utf-8").decode("utf-8") == vtt and "네" in vtt
    for line in vtt.splitlines():
        if "-->" in line:
            a, b = (
                sum(float(x) * m for x, m in zip(t.split(":"), (3600, 60, 1), strict=True)) for t in line.split(" --> ")
            )
            assert b - a <= 7.0 + 1e-6
    # English is laid out too: 15 s of speech is more than one cue
    en = build_segments(_words(["a"] * 30), ["en"] * 30)[0].to_dict()
    assert to_srt([en]).count("-->") >= 3


# --- the embedded multilingual model --------------------------------------------------


def test_embedded_model_is_joined_once_atomically(tmp_path: Path) -> None:
    from pipeline import embedded_whisper as E

    parts, _, _ = E._package_data()
    expected = sum(p.stat().st_size for p in parts)
    folder = E.embedded_multilingual_path(tmp_path)
    assert (folder / "model.bin").stat().st_size == expected
    assert {p.name for p in folder.iterdir()} == {"model.bin", *E.SIDE_FILES}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # nothing left behind
    mtime = (folder / "model.bin").stat().st_mtime_ns
    assert E.embedded_multilingual_path(tmp_path) == folder
    assert (folder / "model.bin").stat().st_mtime_ns == mtime  # reused, not joined again
    # a truncated file (a crash mid-copy in an older version, a full disk) is joined again
    with open(folder / "model.bin", "r+b") as f:
        f.truncate(1000)
    E.embedded_multilingual_path(tmp_path)
    assert (folder / "model.bin").stat().st_size == expected


# --- the timeline picture -------------------------------------------------------------


def test_timeline_renders_hangul(tmp_path: Path) -> None:
    from pipeline.timeline import cjk_font, render_timeline

    if cjk_font() is None:
        pytest.skip("no font with Hangul installed (make system-deps installs fonts-nanum)")

    @dataclass
    class Turn:
        start: float
        end: float
        speaker: str

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        png = render_timeline(
            [Turn(0, 3, "화자 1"), Turn(3, 5, "화자 2")], 5.0, tmp_path / "t.png", title="한국어 대화"
        )
    missing = [str(w.message) for w in caught if "missing from" in str(w.message)]
    assert not missing, missing
    assert png.stat().st_size > 1000 and os.path.getsize(png) == png.stat().st_size
