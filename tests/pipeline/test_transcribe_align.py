"""Transcription and word timing with the embedded tiny.en on pyannote's sample call."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest

from pipeline import align as A
from pipeline import speech_chunks as C
from pipeline import transcribe as T
from pipeline.errors import UnsupportedOptionError
from pipeline.loop_guard import loop_reason
from tests.conftest import GUEST_NAME
from tests.scoring import load_rttm


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


def test_a_decoding_loop_is_decoded_again(asr, sample_wav: Path) -> None:  # type: ignore[no-untyped-def]
    """A synthetic loop: the decoder is made to start every chunk with "thank you" eight times
    (a forced prefix), as Whisper's loops look; the guard re-decodes those chunks alone."""
    looping = copy.copy(asr)  # the module's model stays as it is
    looping.options = dataclasses.replace(asr.options, prefix="thank you " * 8)
    tr = T.transcribe(looping, sample_wav, batch_size=8, second_pass=False)
    text = " ".join(s.text for s in tr.segments)
    assert tr.repaired_chunks >= 1
    assert "thank you thank you" not in text.lower(), text
    assert "chicago" in text.lower(), text
    assert loop_reason("thank you " * 8 + text[:40])  # what the guard saw


def test_a_looping_chunk_decoded_again_gives_the_same_words_every_time(shared_dir: Path, sample_wav: Path) -> None:
    """The 25.6 s chunk that opens Korean-then-English (korean_conv_24s, then the sample's English)
    loops in the batched pass ('투수젠' x40). Decoded again alone, it must give the same words every
    time: with Whisper's temperature fallback (CTranslate2 sampling from a per-thread generator)
    it gave other words, or English gibberish, on each run."""
    import numpy as np

    from pipeline.audio import load_wav

    korean = shared_dir / "audio" / "korean_conv_24s.wav"
    if not korean.is_file():
        pytest.skip(f"{korean} is absent: this test needs ../shared's korean_conv_24s.wav")
    base = T.load_asr_model("embedded-base", device="cpu", compute_type="int8", beam_size=5)
    chunk = np.concatenate([load_wav(korean, 0.0, 24.5), load_wav(sample_wav, 6.0, 7.13)])
    first, second = (T._redecode(base, chunk, "ko", T.DecodeOptions(), "a loop") for _ in range(2))
    assert first.text == second.text, (first.text, second.text)
    assert first.text.count("투스") < 5 and sum("\uac00" <= c <= "\ud7a3" for c in first.text) > 50, first.text


def test_korean_vocabulary_reaches_the_multilingual_decoder(shared_dir: Path) -> None:
    """korean_conv_24s talks about a 투스잼 (a tooth gem); Whisper base hears 투스젠 unless told."""
    base = T.load_asr_model("embedded-base", device="cpu", compute_type="int8", beam_size=5)
    wav = shared_dir / "audio" / "korean_conv_24s.wav"

    def text(**vocabulary: str) -> str:
        tr = T.transcribe(base, wav, language="ko", second_pass=False, **vocabulary)
        return " ".join(s.text for s in tr.segments)

    plain, prompted, hot = text(), text(prompt="투스잼 이야기."), text(hotwords="투스잼")
    print(f"without: {plain}\nprompt: {prompted}\nhotwords: {hot}")
    assert "투스잼" not in plain, plain
    assert prompted.count("투스잼") >= 2 and hot.count("투스잼") >= 2, (prompted, hot)


def test_prompt_and_hotwords_reach_the_english_decoder(asr, guest_name_wav: Path) -> None:  # type: ignore[no-untyped-def]
    def text(**vocabulary: str) -> str:
        return " ".join(s.text for s in T.transcribe(asr, guest_name_wav, second_pass=False, **vocabulary).segments)

    first = GUEST_NAME.split()[0]
    plain, prompted, hot = text(), text(prompt=f"{GUEST_NAME}."), text(hotwords=GUEST_NAME)
    print(f"without: {plain}\nprompt: {prompted}\nhotwords: {hot}")
    assert first not in plain, plain  # tiny.en hears "Shivong"
    assert prompted.count(first) == 2, prompted
    # hotwords reach the decoder: the name is spelt right. How much of the sentence tiny.en keeps
    # beside them varies with the espeak-ng voice (espeak-ng 1.51: "Siobhan Welcome to the show",
    # the sentence that names the guest dropped); the prompt keeps every word.
    assert first in hot, hot


def test_second_pass_decodes_speech_the_first_pass_left_without_words(asr, sample_wav: Path) -> None:  # type: ignore[no-untyped-def]
    """Sheila's "And I'm Sheila in Texas, originally from Chicago" (14.4-17.8 s, sample.stm) taken
    out of a first pass's result, as a missed language change leaves it: the second pass finds it."""
    first = T.transcribe(asr, sample_wav, batch_size=8, second_pass=False)
    acc = T._Decoding(segments=[s for s in first.segments if s.end <= 14.0 or s.start >= 18.0])
    speech = [(14.44, 17.77)]
    T._second_pass(asr_route(asr), sample_wav, speech, 30.0, acc, False, "en", 8, T.DecodeOptions())
    found = [s for s in acc.segments if s.start >= 13.5 and s.end <= 18.5]
    assert found and "chicago" in " ".join(s.text for s in found).lower(), found
    assert acc.second_pass["filled"] == 1 and not acc.reasons
    assert all(14.0 <= w["start"] <= w["end"] <= 18.2 for s in found for w in s.words or [])


def test_second_pass_leaves_a_reason_where_it_hears_no_speech(asr, sample_wav: Path) -> None:  # type: ignore[no-untyped-def]
    """A "turn" over the sample's first seconds (line noise, no words in sample.stm): no words
    are invented there, and metadata.gaps will say why."""
    tr = T.transcribe(asr, sample_wav, batch_size=8, speech_turns=[(0.5, 4.5, "X"), (6.6, 29.9, "Y")])
    assert not [s for s in tr.segments if s.end < 5.0], tr.segments[:2]
    (gap,) = [g for g in tr.gaps if g["start"] < 4.5]
    assert gap["why"].startswith("no words"), gap
    assert tr.second_pass["stretches"] >= 1


def asr_route(model):  # type: ignore[no-untyped-def]
    return T.AsrRoute(main=model, main_name="tiny.en")


def _turns_from_rttm(path: Path) -> list[tuple[float, float, str]]:
    return [(a, b, who) for who, a, b in load_rttm(path)]


def test_speech_chunks_are_the_turns_joined_padded_and_cut_at_quiet_places(tmp_path: Path) -> None:
    import numpy as np
    import soundfile as sf

    sr = 16000
    rng = np.random.default_rng(0)
    audio = (0.3 * rng.standard_normal(100 * sr)).astype(np.float32)
    quiet = [(45.0, 45.3), (72.0, 72.3)]  # where a long turn may be cut
    for a, b in quiet:
        audio[int(a * sr) : int(b * sr)] = 0.0
    wav = tmp_path / "noise.wav"
    sf.write(wav, audio, sr)
    turns = [
        (1.0, 5.0, "A"),
        (4.0, 8.0, "B"),  # overlaps A: one stretch
        (8.3, 12.0, "A"),  # 0.3 s later: joined by the padding
        (20.0, 90.0, "B"),  # 70 s: cut twice, at the quiet places
        (98.0, 120.0, "A"),  # past the window's end: clipped, and joined to the 90 s turn's tail
    ]
    chunks = C.speech_chunks(turns, 0.0, 100.0, wav, 100.0)
    pad = C.TURN_PAD_S
    assert len(chunks) == 4, chunks
    assert chunks[0] == (1.0 - pad, 12.0 + pad)
    assert chunks[1][0] == 20.0 - pad and chunks[3][1] == 100.0
    for (a, b), (_, end) in zip(quiet, chunks[1:3], strict=True):
        assert a <= end <= b  # cut in the silence
    assert [c[0] for c in chunks[2:]] == [c[1] for c in chunks[1:3]]  # nothing between the pieces lost
    assert all(b - a <= C.CHUNK_S for a, b in chunks)
    # a window starting later: its chunks are relative to its start, turns before it ignored
    assert C.speech_chunks(turns, 95.0, 100.0, wav, 100.0) == [(3.0 - pad, 5.0)]


def test_the_diarizations_turns_are_the_speech_no_second_vad(asr, sample_wav: Path) -> None:  # type: ignore[no-untyped-def]
    turns = _turns_from_rttm(sample_wav.with_suffix(".rttm"))
    model = copy.copy(asr)

    def no_vad(*_a, **_k):  # type: ignore[no-untyped-def]
        raise AssertionError("the VAD ran although the diarization's turns were given")

    model.vad_model = no_vad
    tr = T.transcribe(model, sample_wav, batch_size=8, speech_turns=turns)
    text = " ".join(s.text for s in tr.segments).lower()
    assert "chicago" in text and "new jersey" in text
    speech_end = max(b for _, b, _ in turns)
    assert tr.speech_regions[0][0] >= min(a for a, _, _ in turns) - C.TURN_PAD_S - 1e-6
    assert tr.speech_regions[-1][1] <= speech_end + C.TURN_PAD_S + 1e-6


def test_a_first_word_stretched_over_the_noise_before_it_is_cut_to_whisper_s_limit() -> None:
    words = [
        {"word": " Hello.", "start": 0.2, "end": 7.08},  # the chunk starts with 6 s of line noise
        {"word": " Hello.", "start": 7.7, "end": 8.22},
        {"word": " Oh,", "start": 8.32, "end": 8.62},
        {"word": " hi", "start": 8.7, "end": 9.0},
    ]
    max_duration = A._clamp_long_words(words)
    assert max_duration == pytest.approx(2 * 0.41)  # twice the median word (6.88, 0.52, 0.3, 0.3 s)
    A._clamp_first_word(words, max_duration)
    assert words[0]["start"] == pytest.approx(7.08 - max_duration) and words[0]["end"] == 7.08
    assert [w["start"] for w in words[1:]] == [7.7, 8.32, 8.7]
