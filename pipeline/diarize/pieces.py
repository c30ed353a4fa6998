"""Local speaker tracks cut into pieces, twins across overlapping chunks, Silero speech intervals (numpy only)."""

from __future__ import annotations

import math

import numpy as np

from pipeline.errors import ProcessingError


def find_twins(
    masks: np.ndarray, embedded: np.ndarray, *, chunk_step_frames: float, min_overlap: float = 0.5
) -> dict[tuple[int, int], tuple[int, int]]:
    """For pieces not ``embedded`` from their central half, the piece of an adjacent chunk
    that covers at least ``min_overlap`` of their activity and is embedded there.

    masks: shape (num_chunks, num_frames, num_pieces); embedded: (num_chunks, num_pieces)
    """
    num_chunks, num_frames, _ = masks.shape
    shift = int(round(chunk_step_frames))
    twins: dict[tuple[int, int], tuple[int, int]] = {}
    if shift <= 0 or shift >= num_frames:
        return twins
    active = masks > 0
    for c, k in np.argwhere(active.any(axis=1) & ~embedded):
        own = active[c, :, k]
        total = own.sum()
        best, best_overlap = None, min_overlap * total
        for other, offset in ((c - 1, shift), (c + 1, -shift)):
            if not 0 <= other < num_chunks:
                continue
            # frame i of chunk c is frame i + offset of chunk `other`
            lo, hi = max(0, -offset), min(num_frames, num_frames - offset)
            if lo >= hi:
                continue
            window = own[lo:hi]
            candidates = active[other, lo + offset : hi + offset, :] & window[:, None]
            # shape: (overlap frames, num_pieces)
            overlap = candidates.sum(axis=0) * embedded[other]
            j = int(np.argmax(overlap))
            if overlap[j] >= best_overlap:
                best, best_overlap = (int(other), j), overlap[j]
        if best is not None:
            twins[(int(c), int(k))] = best
    return twins


def split_into_pieces(segmentations: np.ndarray, *, max_frames: int, bridge_frames: int) -> np.ndarray:
    """Cut each local speaker's activity into pieces that become local speakers of their own.

    segmentation-3.0 sometimes gives two voices of a chunk one local speaker (often with
    similar synthetic voices, sometimes with real ones). Cutting each track at its pauses
    (gaps longer than ``bridge_frames``) and every ``max_frames`` lets the clustering, which
    sees every piece, tell them apart; pyannote's reconstruction is unchanged since the
    pieces of a track partition its activity.

    Args:
        segmentations: shape (num_chunks, num_frames, num_speakers), 0/1 (NaN = 0)

    Returns:
        shape (num_chunks, num_frames, max number of pieces in a chunk), 0/1
    """
    activity = np.nan_to_num(segmentations, nan=0.0) > 0
    num_chunks, num_frames, num_speakers = activity.shape
    chunks: list[list[tuple[int, int, int]]] = []
    for c in range(num_chunks):
        chunk_pieces: list[tuple[int, int, int]] = []
        for s in range(num_speakers):
            for start, end in _runs(activity[c, :, s], bridge_frames):
                num = math.ceil((end - start) / max_frames)
                bounds = np.linspace(start, end, num + 1).round().astype(int)
                chunk_pieces.extend((s, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        chunks.append(chunk_pieces)
    pieces = np.zeros((num_chunks, num_frames, max(1, max(map(len, chunks), default=0))), dtype=np.float32)
    for c, chunk_pieces in enumerate(chunks):
        for k, (s, a, b) in enumerate(chunk_pieces):
            pieces[c, a:b, k] = activity[c, a:b, s]
    return pieces


def speech_intervals(audio: np.ndarray, sample_rate: int, *, threshold: float = 0.5) -> np.ndarray:
    """Speech (start, end) in seconds from Silero VAD (the ONNX model bundled with faster-whisper).

    Returns:
        shape (num_intervals, 2)
    """
    try:
        from faster_whisper.vad import VadOptions, get_speech_timestamps
    except ImportError as e:
        raise ProcessingError(
            "Diarization uses Silero VAD from faster-whisper, which is not installed: "
            "`pip install faster-whisper` (or build the pipeline with vad_threshold=None)."
        ) from e
    options = VadOptions(threshold=threshold, min_speech_duration_ms=100, min_silence_duration_ms=100, speech_pad_ms=30)
    stamps = get_speech_timestamps(np.ascontiguousarray(audio, dtype=np.float32), options, sampling_rate=sample_rate)
    return np.array([(s["start"] / sample_rate, s["end"] / sample_rate) for s in stamps], dtype=np.float64).reshape(
        -1, 2
    )


def _runs(active: np.ndarray, bridge_frames: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges of activity, bridging gaps of at most ``bridge_frames``."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], active.astype(np.int8), [0]])))
    starts, ends = edges[::2], edges[1::2]
    runs: list[tuple[int, int]] = []
    for start, end in zip(starts, ends, strict=True):
        if runs and start - runs[-1][1] <= bridge_frames:
            runs[-1] = (runs[-1][0], int(end))
        else:
            runs.append((int(start), int(end)))
    return runs
