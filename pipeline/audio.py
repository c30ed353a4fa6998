"""The one audio format every stage after ingest reads: 16 kHz mono float32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16000


def load_wav(path: Path | str, start: float = 0.0, end: float | None = None) -> np.ndarray:
    """Read (part of) a 16 kHz mono WAV written by ingest. Returns float32 in [-1, 1].

    shape: (num_samples,)
    """
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        if f.samplerate != SAMPLE_RATE or f.channels != 1:
            raise ValueError(f"{path}: expected 16 kHz mono, got {f.samplerate} Hz x {f.channels}")
        first = int(round(start * SAMPLE_RATE))
        last = f.frames if end is None else min(f.frames, int(round(end * SAMPLE_RATE)))
        f.seek(first)
        data = f.read(max(0, last - first), dtype="float32", always_2d=False)
    return np.ascontiguousarray(data, dtype=np.float32)


def wav_duration(path: Path | str) -> float:
    import soundfile as sf

    info = sf.info(str(path))
    return float(info.frames) / float(info.samplerate)


def quiet_cut(wav_path: Path | str, start: float, end: float, total: float, search_s: float = 15.0) -> float:
    """Where to end a window that starts at ``start`` and should end near ``end``.

    The middle of the quietest 100 ms (lowest mean energy) in the ``search_s`` seconds
    before ``end``, never within 1 s of ``start``; ``total`` (the file's duration) when
    ``end`` reaches it, so that the last window takes the rest of the file. Reads only the
    searched stretch of the file.
    """
    if end >= total:
        return total
    lo = max(start + 1.0, end - search_s)
    audio = load_wav(wav_path, lo, end)
    hop = SAMPLE_RATE // 10
    if len(audio) < hop:
        return end
    frames = audio[: len(audio) // hop * hop].reshape(-1, hop)
    energy = (frames.astype(np.float64) ** 2).mean(axis=1)
    return lo + (int(np.argmin(energy)) + 0.5) * 0.1


def release_freed_memory() -> None:
    """Give the memory that the C heap holds free back to the system (glibc's
    ``malloc_trim``; nothing elsewhere).

    Between diarization windows, and after each stage, nothing of what ran is alive, but
    glibc keeps the freed pages: without this a long-lived worker's RSS stays at the peak.
    """
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None
