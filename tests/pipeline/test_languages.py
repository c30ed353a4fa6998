"""Languages, locales and the per-language pieces that need no model: the language rule, the
message catalog, aligner selection and its fallback, subtitle cues for Korean/Japanese/Chinese,
segments that keep their language, the joined embedded model, the Hangul timeline."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ecg_audio import messages
from ecg_audio.languages import aligner_name, check_job, normalize
from ecg_audio.settings import Settings
from pipeline.align import align_by_language
from pipeline.errors import UnsupportedOptionError
from pipeline.exports import to_srt, to_vtt
from pipeline.merge import WordOut, build_segments
from pipeline.speech_types import AlignedSegment, Alignment, AsrSegment, Transcript, Word


def settings(**kw: Any) -> Settings:
    return Settings(_env_file=None, **kw)  # type: ignore[call-arg]


# --- the language rule ----------------------------------------------------------------


def test_languages_are_normalised() -> None:
    assert normalize("KO") == normalize("ko-KR") == normalize("ko_KR") == normalize("korean") == "ko"
    assert normalize("yue") == "yue" and normalize(None) is None and normalize("") is None


def test_default_deployment_serves_every_whisper_language() -> None:
    s = settings()
    assert check_job("ko", None, s).language == "ko"
    assert check_job("ja-JP", None, s).language == "ja"
    assert check_job(None, None, s).language is None  # identified, never forced to English


def test_unknown_language_is_refused_saying_what_to_do() -> None:
    with pytest.raises(UnsupportedOptionError) as e:
        check_job("xx", None, settings())
    assert e.value.code == "UNSUPPORTED_OPTION"
    assert "'xx'" in e.value.message and "ECG_ASR_MULTILINGUAL_MODEL" in e.value.message


def test_english_only_deployment_refuses_other_languages() -> None:
    s = settings(asr_model="embedded", asr_multilingual_model="none")
    assert s.asr_multilingual_model is None  # 'none' = English only
    with pytest.raises(UnsupportedOptionError, match="ECG_ASR_MULTILINGUAL_MODEL"):
        check_job("ko", None, s)
    assert check_job("en", None, s).language == "en"


def test_model_option_must_be_allowed_and_able() -> None:
    s = settings(asr_model_allowlist=["small"])
    assert check_job(None, "small", s).model == "small"
    assert check_job("ko", "embedded-base", s).model == "embedded-base"
    with pytest.raises(UnsupportedOptionError, match="ECG_ASR_MODEL_ALLOWLIST"):
        check_job(None, "large-v3", s)
    with pytest.raises(UnsupportedOptionError, match="English-only"):
        check_job("ko", "embedded", s)  # tiny.en cannot do Korean


# --- messages -------------------------------------------------------------------------


def test_every_message_has_english_and_korean() -> None:
    for key, texts in messages.MESSAGES.items():
        assert set(texts) == set(messages.LOCALES), key
        assert any("\uac00" <= c <= "\ud7a3" for c in texts["ko"]), key  # Hangul syllables
    for code, texts in messages.ERRORS.items():
        assert set(texts) == set(messages.LOCALES), code


def test_design_messages_are_the_korean_milestones() -> None:
    ko = {texts["ko"] for texts in messages.MESSAGES.values()}
    for design in ("비디오 다운로드 완료", "음성 구간 감지 중...", "화자 식별 중...", "음성을 텍스트로 변환 중...",
                   "결과 정리 중...", "분석 완료"):  # fmt: skip
        assert design in ko


def test_stage_table_messages_are_all_in_the_catalog() -> None:
    from ecg_audio.stage_table import REPORTED_KEYS

    # every message key a stage reports (milestones and steps) has its English and Korean text
    for key in REPORTED_KEYS:
        assert key in messages.MESSAGES, key
        assert messages.text(key, "ko") != messages.text(key, "en"), key


def test_locale_from_options_or_accept_language() -> None:
    assert messages.resolve_locale("ko-KR,ko;q=0.9,en;q=0.8") == "ko"
    assert messages.resolve_locale("fr-FR,ko;q=0.5") == "ko"
    assert messages.resolve_locale("fr") == "en" and messages.resolve_locale(None, "ko") == "ko"
    assert messages.text("transcription.running", "ko-KR") == "음성을 텍스트로 변환 중..."
    assert messages.text("transcription.running", "fr") == "Transcribing"
    assert (
        messages.failed("INVALID_MEDIA", "no audio stream", "ko")
        == "실패: 읽을 수 없는 미디어 파일입니다: no audio stream"
    )
    assert messages.failed("INVALID_MEDIA", "no audio stream", "en") == "Failed: no audio stream"


# --- word times per language ----------------------------------------------------------


def test_aligner_per_language_and_fallback() -> None:
    s = settings(alignment_models={"ko": "kresnik/wav2vec2-large-xlsr-korean"})
    assert aligner_name("ko", s) == "kresnik/wav2vec2-large-xlsr-korean"
    assert aligner_name("ko-KR", s) == "kresnik/wav2vec2-large-xlsr-korean"
    assert aligner_name("en", s) is None  # Whisper's own
    assert aligner_name("en", settings(alignment_model="WAV2VEC2_ASR_BASE_960H")) == "WAV2VEC2_ASR_BASE_960H"


def test_env_mapping_is_read_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECG_ALIGNMENT_MODELS", '{"ko": "/models/ko-aligner", "ja": "jonatasgrosman/x"}')
    assert settings().alignment_models == {"ko": "/models/ko-aligner", "ja": "jonatasgrosman/x"}


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
