"""Transcription and word timing with the embedded tiny.en on pyannote's sample call."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import align as A
from pipeline import transcribe as T
from pipeline.errors import UnsupportedOptionError


@pytest.fixture(scope="module")
def asr():  # type: ignore[no-untyped-def]
    return T.load_asr_model("embedded", device="cpu", compute_type="int8", beam_size=5)


def test_transcribe_and_align_sample(asr, sample_wav: Path) -> None:  # type: ignore[no-untyped-def]
    steps: list[str] = []
    tr = T.transcribe(asr, sample_wav, batch_size=8, hook=lambda step, f: steps.append(step))
    text = " ".join(s.text for s in tr.segments).lower()
    assert "chicago" in text and "new jersey" in text
    assert steps[0] == "vad" and steps[-1] == "asr"
    assert tr.language == "en" and tr.speech_regions
    al = A.align_with_whisper(asr, sample_wav, tr)
    assert al.method == "whisper"
    words = al.words
    assert len(words) >= 60
    for seg in al.segments:
        for w in seg.words:
            assert seg.start - 1e-3 <= w.start <= w.end <= seg.end + 1e-3
    starts = [w.start for w in words]
    assert starts == sorted(starts)
    chicago = [w for w in words if w.word.lower().startswith("chicago")]
    # the reference (sample.stm) has "Chicago" at about 16.9-17.7 s and 19.0-19.5 s
    assert any(16.0 < w.start < 18.0 for w in chicago) and any(18.5 < w.start < 20.5 for w in chicago)


def test_repetition_loops_are_detected() -> None:
    assert T._looks_degenerate("m " * 60)
    assert T._looks_degenerate("thank you " * 20)
    assert not T._looks_degenerate("And I'm Sheila in Texas, originally from Chicago. Oh, I'm from Chicago also.")


def test_non_english_on_english_only_model_is_refused(asr) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnsupportedOptionError, match="ECG_ASR_MULTILINGUAL_MODEL"):
        T.check_language(asr, "de", "embedded")
    assert T.check_language(asr, "en", "embedded") == "en"
