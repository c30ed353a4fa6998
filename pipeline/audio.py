"""The one audio format every stage after ingest reads: 16 kHz mono float32."""

from __future__ import annotations

from pathlib import Path

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
