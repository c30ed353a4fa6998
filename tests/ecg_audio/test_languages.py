"""Languages and locales in the job core, no model needed: the language rule (normalising, which
languages and models a deployment serves), the message catalog and locale choice, the aligner per
language. The per-language pipeline pieces are in tests/pipeline/test_languages.py."""

from __future__ import annotations

from typing import Any

import pytest

from ecg_audio import messages
from ecg_audio.languages import aligner_name, check_job, normalize
from ecg_audio.settings import Settings
from pipeline.errors import UnsupportedOptionError


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
