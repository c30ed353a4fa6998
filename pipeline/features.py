"""Voice features: frame-level tracks computed once per file, summarised per segment.

The tracks (13 MFCCs, f0 from YIN, RMS level) are computed block by block, so
memory stays bounded however long the recording is; a segment's features are
then a cheap aggregation over its frames.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.audio import SAMPLE_RATE, load_wav, wav_duration

HOP = 320  # 20 ms
N_FFT = 1024  # 64 ms analysis window
N_MFCC = 13
F0_MIN, F0_MAX = 60.0, 500.0
BLOCK_S = 60.0
SILENCE_DB = -50.0  # frames quieter than this are not voiced, whatever YIN says


@dataclass
class FeatureTracks:
    """Frame ``i`` is centred at ``i * HOP / SAMPLE_RATE`` seconds."""

    mfcc: np.ndarray  # shape: (num_frames, 13)
    f0: np.ndarray  # shape: (num_frames,), Hz, NaN where unvoiced
    rms_db: np.ndarray  # shape: (num_frames,)

    @property
    def frame_rate(self) -> float:
        return SAMPLE_RATE / HOP

    def save(self, path: Path) -> None:
        with open(path, "wb") as fh:
            np.savez(fh, mfcc=self.mfcc, f0=self.f0, rms_db=self.rms_db)

    @classmethod
    def load(cls, path: Path) -> FeatureTracks:
        with np.load(path) as z:
            return cls(mfcc=z["mfcc"], f0=z["f0"], rms_db=z["rms_db"])


def compute_tracks(
    wav_path: Path, *, hook: Callable[[float], None] | None = None, threads: int | None = None
) -> FeatureTracks:
    """Frame-level MFCC, f0 and RMS over the whole file, block by block; ``threads`` blocks at
    once (default: the cores this process may use; numpy's FFTs and loops, and YIN's numba
    kernels, release the GIL), each block's tracks independent of the others."""
    import librosa

    duration = wav_duration(wav_path)
    total_frames = int(np.floor(duration * SAMPLE_RATE / HOP)) + 1
    block_frames = int(BLOCK_S * SAMPLE_RATE / HOP)
    mel_basis = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=40)
    firsts = list(range(0, total_frames, block_frames))
    if not firsts:
        empty = np.zeros((0,), np.float32)
        return FeatureTracks(mfcc=np.zeros((0, N_MFCC), np.float32), f0=empty, rms_db=empty)

    def block(first: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _block_tracks(wav_path, first, min(block_frames, total_frames - first), mel_basis)

    workers = max(1, threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    with ThreadPoolExecutor(max_workers=min(workers, len(firsts)), thread_name_prefix="ecg-features") as pool:
        for first, part in zip(firsts, pool.map(block, firsts), strict=True):
            parts.append(part)
            if hook is not None:
                hook(min(1.0, (first + len(part[1])) / total_frames))
    return FeatureTracks(
        mfcc=np.concatenate([m for m, _, _ in parts]),
        f0=np.concatenate([f for _, f, _ in parts]),
        rms_db=np.concatenate([r for _, _, r in parts]),
    )


def _block_tracks(
    wav_path: Path, first: int, n: int, mel_basis: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MFCC, f0 and RMS dB of frames ``first`` .. ``first + n - 1``."""
    import librosa

    half = N_FFT // 2
    centre0 = first * HOP
    start = max(0, centre0 - half)
    audio = load_wav(wav_path, start / SAMPLE_RATE, (centre0 + (n - 1) * HOP + half) / SAMPLE_RATE)
    # pad so that frame j is centred exactly at sample centre0 + j * HOP
    left = half - (centre0 - start)
    need = (n - 1) * HOP + N_FFT
    audio = np.pad(audio, (left, max(0, need - left - len(audio))))[:need]
    spec = np.abs(librosa.stft(audio, n_fft=N_FFT, hop_length=HOP, center=False)) ** 2
    # shape: (1 + N_FFT // 2, n)
    mel_db = librosa.power_to_db(mel_basis @ spec, ref=1.0, top_db=None)
    mfcc = librosa.feature.mfcc(S=mel_db, n_mfcc=N_MFCC)[:, :n].T
    frames = librosa.util.frame(audio, frame_length=N_FFT, hop_length=HOP)[:, :n]
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=0))
    rms_db = 20.0 * np.log10(np.maximum(rms, 1e-10))
    f0 = librosa.yin(audio, fmin=F0_MIN, fmax=F0_MAX, sr=SAMPLE_RATE, frame_length=N_FFT, hop_length=HOP, center=False)[
        :n
    ]
    unvoiced = (rms_db < SILENCE_DB) | (f0 <= F0_MIN * 1.01) | (f0 >= F0_MAX * 0.99)
    f0 = np.where(unvoiced, np.nan, f0)
    return mfcc.astype(np.float32), f0.astype(np.float32), rms_db.astype(np.float32)


def warm_up() -> float:
    """Compute the tracks of two seconds of synthetic voice, and return the seconds it took.

    librosa's YIN and peak picking are numba functions compiled on first use (many seconds
    when no cache exists: a new container, a new venv). A worker calls this at start, so
    that cost never lands on a job's features stage; numba caches the result
    (``NUMBA_CACHE_DIR`` or beside librosa), so a restart pays little.
    """
    import tempfile
    import time

    import soundfile as sf

    t0 = time.perf_counter()
    t = np.arange(int(2.0 * SAMPLE_RATE)) / SAMPLE_RATE
    voice = 0.3 * np.sin(2 * np.pi * 140.0 * t) * (t < 1.5)
    with tempfile.TemporaryDirectory(prefix="ecg-warm-") as tmp:
        path = Path(tmp) / "warm.wav"
        sf.write(str(path), voice.astype(np.float32), SAMPLE_RATE, subtype="FLOAT")
        tracks = compute_tracks(path)
        segment_features(tracks, 0.0, 1.5, 3)
    return time.perf_counter() - t0


def segment_features(tracks: FeatureTracks, start: float, end: float, num_words: int) -> dict[str, object]:
    """Summary of one segment: MFCC means, f0 mean/std, RMS dB mean/max, words per second."""
    a = max(0, int(np.floor(start * tracks.frame_rate)))
    b = min(len(tracks.rms_db), max(a + 1, int(np.ceil(end * tracks.frame_rate))))
    duration = max(end - start, 1e-6)
    if b <= a:
        return {
            "mfcc_mean": [0.0] * N_MFCC,
            "f0_mean_hz": None,
            "f0_std_hz": None,
            "voiced_ratio": 0.0,
            "rms_db_mean": None,
            "rms_db_max": None,
            "words_per_second": round(num_words / duration, 3),
        }
    f0 = tracks.f0[a:b]
    voiced = f0[~np.isnan(f0)]
    rms = tracks.rms_db[a:b]
    return {
        "mfcc_mean": [round(float(v), 3) for v in tracks.mfcc[a:b].mean(axis=0)],
        "f0_mean_hz": round(float(voiced.mean()), 2) if voiced.size else None,
        "f0_std_hz": round(float(voiced.std()), 2) if voiced.size else None,
        "voiced_ratio": round(float(voiced.size / (b - a)), 3),
        "rms_db_mean": round(float(rms.mean()), 2),
        "rms_db_max": round(float(rms.max()), 2),
        "words_per_second": round(num_words / duration, 3),
    }
