"""Whisper's chunks of speech from the diarization's turns.

The transcribe stage always has the diarization's turns (Silero-gated segmentation-3.0): the
speech found once per file, that WhisperX's own VAD would find a second time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.audio import quiet_cut

CUT_SEARCH_S = 15.0  # look this far back from a window's or a piece's end for a quiet place to cut
CHUNK_S = 30.0  # Whisper's window: the most audio one decoding reads
TURN_PAD_S = 0.3  # the diarization's turns are widened by this much when they become chunks


def speech_chunks(
    turns: Sequence[tuple[float, float, str]], start: float, end: float, wav_path: Path, total: float
) -> list[tuple[float, float]]:
    """The diarization's speech in [start, end] as Whisper's chunks (seconds from ``start``).

    The turns' union, each stretch padded by ``TURN_PAD_S`` (a turn
    ends where the voice does, a word's last sound may trail it), is cut into pieces of at most
    30 s at the quietest moment near each piece's end, and consecutive pieces are joined up to
    30 s, as WhisperX joins its VAD's segments (``Vad.merge_chunks``)."""
    merged: list[list[float]] = []
    for a, b, _ in sorted(turns):
        a, b = max(start, a - TURN_PAD_S), min(end, b + TURN_PAD_S)
        if b <= a:
            continue
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    pieces: list[tuple[float, float]] = []
    for a, b in merged:
        while b - a > CHUNK_S:
            cut = quiet_cut(wav_path, a, a + CHUNK_S, total, CUT_SEARCH_S)
            pieces.append((a, cut))
            a = cut
        pieces.append((a, b))
    chunks: list[tuple[float, float]] = []
    for a, b in pieces:
        if chunks and b - chunks[-1][0] <= CHUNK_S:
            chunks[-1] = (chunks[-1][0], b)
        else:
            chunks.append((a, b))
    return [(round(a - start, 3), round(b - start, 3)) for a, b in chunks]
