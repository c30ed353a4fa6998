"""Voice features on signals whose answer is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline.features import N_MFCC, compute_tracks, segment_features


def _write(path: Path, audio: np.ndarray) -> Path:
    sf.write(path, audio.astype(np.float32), 16000, subtype="PCM_16")
    return path


def test_pitch_and_level_of_a_tone(tmp_path: Path) -> None:
    t = np.arange(16000 * 3) / 16000
    tone = 0.5 * np.sin(2 * np.pi * 180.0 * t)
    silence = np.zeros(16000 * 2)
    wav = _write(tmp_path / "tone.wav", np.concatenate([tone, silence]))
    tracks = compute_tracks(wav)
    loud = segment_features(tracks, 0.2, 2.8, num_words=6)
    quiet = segment_features(tracks, 3.2, 4.8, num_words=0)
    assert abs(loud["f0_mean_hz"] - 180.0) < 5.0
    assert loud["f0_std_hz"] < 5.0
    assert len(loud["mfcc_mean"]) == N_MFCC
    assert -12.0 < loud["rms_db_mean"] < -6.0  # 0.5 amplitude sine: about -9 dB
    assert loud["words_per_second"] == round(6 / 2.6, 3)
    assert quiet["f0_mean_hz"] is None and quiet["voiced_ratio"] == 0.0
    assert quiet["rms_db_max"] < -60


def test_tracks_do_not_depend_on_block_boundaries(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(1)
    wav = _write(tmp_path / "noise.wav", 0.1 * rng.standard_normal(16000 * 5))
    whole = compute_tracks(wav)
    import pipeline.features as F

    monkeypatch.setattr(F, "BLOCK_S", 1.3)
    blocked = compute_tracks(wav)
    assert whole.rms_db.shape == blocked.rms_db.shape
    np.testing.assert_allclose(whole.rms_db, blocked.rms_db, atol=1e-3)
    np.testing.assert_allclose(whole.mfcc, blocked.mfcc, atol=1e-2)


def test_blocks_computed_side_by_side_give_the_same_tracks(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(2)
    t = np.arange(16000 * 6) / 16000
    wav = _write(tmp_path / "voice.wav", 0.3 * np.sin(2 * np.pi * 150 * t) + 0.01 * rng.standard_normal(len(t)))
    import pipeline.features as F

    monkeypatch.setattr(F, "BLOCK_S", 1.1)  # six blocks
    seen: list[float] = []
    one = compute_tracks(wav, threads=1)
    three = compute_tracks(wav, threads=3, hook=seen.append)
    for a, b in ((one.mfcc, three.mfcc), (one.f0, three.f0), (one.rms_db, three.rms_db)):
        np.testing.assert_array_equal(a, b)
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) == 6
