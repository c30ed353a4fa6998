"""How much audio language identification reads, with a fake Whisper that records it.

The encoder is the cost of identification (Whisper base's encoder, on every chunk of a file
whose language is not given): each chunk's probe is read short first, and only the probes
that name another language than the window's majority are read again at full length.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from whisperx.audio import N_SAMPLES
from whisperx.audio import log_mel_spectrogram as whisper_mel  # before the fixture fakes it

from pipeline import language_id as L
from pipeline.audio import SAMPLE_RATE

Truth = Callable[[int, int], tuple[str, float]]


class FakeWhisper:
    """``identify``'s view of a faster-whisper model: ``encode`` then ``model.detect_language``.
    Each piece is filled with its marker, which the fake mel keeps, so the detector knows
    which piece it reads and how many frames of it."""

    feat_kwargs = {"feature_size": 80}

    def __init__(self, truth: Truth) -> None:
        self.truth = truth
        self.reads: list[tuple[int, int]] = []  # (pieces, frames) per encoder call
        self.model = self

    def encode(self, feats: np.ndarray) -> np.ndarray:
        self.reads.append((feats.shape[0], feats.shape[-1]))
        return feats

    def detect_language(self, encoded: np.ndarray) -> list[list[tuple[str, float]]]:
        out = []
        for item in encoded:
            lang, p = self.truth(int(round(float(item[0, 0]))), item.shape[-1])
            out.append([(f"<|{lang}|>", p)])
        return out


class FakeModel:
    def __init__(self, truth: Truth) -> None:
        self.model = FakeWhisper(truth)


@pytest.fixture(autouse=True)
def marker_mel(monkeypatch: pytest.MonkeyPatch) -> None:
    import whisperx.audio

    def mel(piece: np.ndarray, n_mels: int, padding: int) -> np.ndarray:
        return np.full((n_mels, (len(piece) + padding) // 160), piece[0] if len(piece) else 0.0, dtype=np.float32)

    monkeypatch.setattr(whisperx.audio, "log_mel_spectrogram", mel)


def _audio(markers: list[int], chunk_s: float) -> tuple[np.ndarray, list[tuple[float, float]]]:
    n = int(chunk_s * SAMPLE_RATE)
    audio = np.concatenate([np.full(n, float(m), dtype=np.float32) for m in markers])
    return audio, [(k * chunk_s, (k + 1) * chunk_s) for k in range(len(markers))]


def test_probes_are_read_short_and_only_the_odd_ones_read_again_at_full_length() -> None:
    def truth(marker: int, frames: int) -> tuple[str, float]:
        if marker == 3:  # a short read goes astray, a long one hears English
            return ("la", 0.72) if frames < L.IDENTIFY_FRAMES else ("en", 0.8)
        return ("ko", 0.97) if marker == 4 else ("en", 0.95)

    model = FakeModel(truth)
    audio, spans = _audio([1, 2, 3, 4, 5], 20.0)
    out_spans, langs = L.chunk_languages(model, audio, spans, [], batch_size=8)
    assert out_spans == spans
    assert [lang for lang, _ in langs] == ["en", "en", "en", "ko", "en"]
    # five probes read on their first 5 s, then the two that did not say English on 15 s
    assert model.model.reads == [(5, L.QUICK_FRAMES), (2, L.IDENTIFY_FRAMES)]


def test_a_file_in_one_language_is_read_once_and_short() -> None:
    model = FakeModel(lambda marker, frames: ("ko", 0.9))
    audio, spans = _audio([1, 2, 3], 25.0)
    _, langs = L.chunk_languages(model, audio, spans, [], batch_size=2)
    assert [lang for lang, _ in langs] == ["ko"] * 3
    assert model.model.reads == [(2, L.QUICK_FRAMES), (1, L.QUICK_FRAMES)]


def test_identify_reads_at_most_the_frames_asked_for_and_short_pieces_whole() -> None:
    model = FakeModel(lambda marker, frames: ("en", 0.9))
    pieces = [np.full(int(s * SAMPLE_RATE), 1.0, dtype=np.float32) for s in (2.0, 30.0)]
    L.identify(model, pieces, batch_size=8)
    assert sorted(model.model.reads) == [(1, L.PROBE_STEP_FRAMES), (1, L.IDENTIFY_FRAMES)]
    model.model.reads.clear()
    L.identify(model, pieces, batch_size=8, frames=L.QUICK_FRAMES)
    assert model.model.reads == [(2, L.QUICK_FRAMES)]


def _two_runs(tail_marker: float) -> tuple[np.ndarray, list[tuple[float, float]], list[tuple[float, float]]]:
    """Three 20 s chunks of English; the first one's second speaker run (11-19 s) is ``tail_marker``."""
    audio = np.full(60 * SAMPLE_RATE, 1.0, dtype=np.float32)
    audio[10 * SAMPLE_RATE : 20 * SAMPLE_RATE] = tail_marker
    spans = [(0.0, 20.0), (20.0, 40.0), (40.0, 60.0)]
    runs = [(0.0, 9.0), (11.0, 19.0), (20.0, 39.0), (40.0, 59.0)]
    return audio, spans, runs


def test_a_chunk_is_cut_where_a_sure_second_language_starts() -> None:
    model = FakeModel(lambda marker, frames: ("ko", 0.95) if marker == 2 else ("en", 0.95))
    audio, spans, runs = _two_runs(2.0)
    out_spans, langs = L.chunk_languages(model, audio, spans, runs, batch_size=8)
    assert out_spans[:2] == [(0.0, 10.0), (10.0, 20.0)]
    assert [lang for lang, _ in langs] == ["en", "ko", "en", "en"]


def test_an_unsure_other_language_in_a_short_run_does_not_cut_the_chunk() -> None:
    # Whisper base calls a few seconds of synthetic English 'cy' (Welsh) with p 0.51
    model = FakeModel(lambda marker, frames: ("cy", 0.51) if marker == 2 else ("en", 0.95))
    audio, spans, runs = _two_runs(2.0)
    out_spans, langs = L.chunk_languages(model, audio, spans, runs, batch_size=8)
    assert out_spans == spans
    assert [lang for lang, _ in langs] == ["en"] * 3


@pytest.mark.parametrize("seconds,read", [(2.2, 300), (4.2, 300), (7.0, 500), (20.0, 1500)])
def test_a_probe_s_mel_padded_to_its_frames_is_whisper_s_mel_padded_to_30_s(seconds: float, read: int) -> None:
    rng = np.random.default_rng(1)
    audio = (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)
    piece = audio[: read * 160]
    whole = np.asarray(whisper_mel(piece, n_mels=80, padding=N_SAMPLES - len(piece)))[:, :read]
    short = np.asarray(whisper_mel(piece, n_mels=80, padding=read * 160 - len(piece) + L.MEL_TAIL))[:, :read]
    assert short.shape == whole.shape == (80, read)
    np.testing.assert_allclose(short, whole, atol=1e-5)


def _six_chunks(head_of_fourth: float) -> tuple[np.ndarray, list[tuple[float, float]], list[tuple[float, float]]]:
    """Six 20 s chunks, two speaker runs each (0-9 s and 11-19 s of each chunk); the runs read as
    marker 1 (English), except the first chunk's last run (marker 2) and the fourth chunk's first
    run (``head_of_fourth``)."""
    audio = np.full(120 * SAMPLE_RATE, 1.0, dtype=np.float32)
    audio[10 * SAMPLE_RATE : 20 * SAMPLE_RATE] = 2.0
    audio[60 * SAMPLE_RATE : 70 * SAMPLE_RATE] = head_of_fourth
    spans = [(20.0 * k, 20.0 * k + 20.0) for k in range(6)]
    runs = [r for k in range(6) for r in ((20.0 * k, 20.0 * k + 9.0), (20.0 * k + 11.0, 20.0 * k + 19.0))]
    return audio, spans, runs


def _marker_truth(marker: int, frames: int) -> tuple[str, float]:
    return ("ko", 0.95) if marker in (2, 3) else ("en", 0.95)


def test_a_long_window_whose_chunks_all_begin_in_one_language_is_read_at_the_heads_only() -> None:
    model = FakeModel(_marker_truth)
    audio, spans, runs = _six_chunks(1.0)
    out_spans, langs = L.chunk_languages(model, audio, spans, runs, batch_size=8)
    assert model.model.reads == [(6, L.QUICK_FRAMES)]  # six heads, no tail
    # the first chunk's Korean tail is left to the second pass (speech without words)
    assert out_spans == spans and [lang for lang, _ in langs] == ["en"] * 6


def test_a_long_window_with_a_chunk_beginning_in_another_language_is_read_at_the_tails_too() -> None:
    model = FakeModel(_marker_truth)
    audio, spans, runs = _six_chunks(3.0)  # the fourth chunk begins in Korean
    out_spans, langs = L.chunk_languages(model, audio, spans, runs, batch_size=8)
    # heads, the Korean head again on its whole 9 s; every tail, the Korean one again; then the
    # runs of the two chunks that change language, to cut them
    assert model.model.reads == [(6, 500), (1, 1000), (6, 500), (1, 1000), (4, 1000)]
    assert out_spans == [(0.0, 10.0), (10.0, 20.0), (20.0, 40.0), (40.0, 60.0), (60.0, 70.0), (70.0, 80.0)] + spans[4:]
    assert [lang for lang, _ in langs] == ["en", "ko", "en", "en", "ko", "en", "en", "en"]


def test_a_probe_read_whole_the_first_time_is_not_read_again() -> None:
    model = FakeModel(lambda marker, frames: ("ko", 0.95) if marker == 2 else ("en", 0.95))
    audio = np.concatenate([np.full(20 * SAMPLE_RATE, 1.0), np.full(4 * SAMPLE_RATE, 2.0)]).astype(np.float32)
    spans = [(0.0, 20.0), (20.0, 24.0)]  # the Korean chunk is 4 s: its 5 s read holds all of it
    _, langs = L.chunk_languages(model, audio, spans, [], batch_size=8)
    assert [lang for lang, _ in langs] == ["en", "ko"]
    assert model.model.reads == [(2, L.QUICK_FRAMES)]
