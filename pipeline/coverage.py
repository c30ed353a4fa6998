"""How much of the speech has words: ``speech_coverage`` and the stretches left without any.

Speech is what the diarization calls speech (the union of its turns); a word covers its own
time plus ``WORD_PAD_S`` on each side, and the pause between two words of one segment up to
``BRIDGE_S``. Whisper's cross-attention word times drift by a few tenths of a second and a
diarization turn takes in the breath before and after the words, so bare word spans would
leave every turn's edges "uncovered" even when no word is missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

WORD_PAD_S = 0.5
BRIDGE_S = 1.5  # the pause that starts a new segment (pipeline.merge.MAX_GAP_S)
MIN_GAP_S = 1.0  # an uncovered stretch shorter than this is a pause, not lost speech
LOW_COVERAGE = 0.9  # below this a job says so in metadata.notes and the log

Interval = tuple[float, float]


@dataclass
class Gap:
    """A stretch of speech with no words, and why."""

    start: float
    end: float
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {"start": round(self.start, 3), "end": round(self.end, 3), "why": self.why}


def union(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, non-overlapping intervals covering the same time."""
    out: list[list[float]] = []
    for a, b in sorted((float(a), float(b)) for a, b in intervals if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def subtract(base: Sequence[Interval], minus: Sequence[Interval]) -> list[Interval]:
    """``base`` less ``minus`` (both from ``union``)."""
    out: list[Interval] = []
    j = 0
    for a, b in base:
        cur = a
        while j < len(minus) and minus[j][1] <= cur:
            j += 1
        k = j
        while k < len(minus) and minus[k][0] < b:
            if minus[k][0] > cur:
                out.append((cur, minus[k][0]))
            cur = max(cur, minus[k][1])
            k += 1
        if cur < b:
            out.append((cur, b))
    return out


def total(intervals: Iterable[Interval]) -> float:
    return sum(b - a for a, b in intervals)


def word_cover(segments: Iterable[Sequence[Interval]]) -> list[Interval]:
    """The time words cover: per segment (its words' (start, end) in order), each word padded
    by WORD_PAD_S and the pauses between its words up to BRIDGE_S bridged."""
    spans: list[Interval] = []
    for words in segments:
        prev_end: float | None = None
        for a, b in words:
            spans.append((a - WORD_PAD_S, max(a, b) + WORD_PAD_S))
            if prev_end is not None and 0 < a - prev_end <= BRIDGE_S:
                spans.append((prev_end, a))
            prev_end = max(b, prev_end or b)
    return union(spans)


def uncovered(
    speech: Iterable[Interval], segments: Iterable[Sequence[Interval]], min_s: float = MIN_GAP_S
) -> list[Interval]:
    """Stretches of ``speech`` at least ``min_s`` long that no word covers."""
    left = subtract(union(speech), word_cover(segments))
    return [(a, b) for a, b in left if b - a >= min_s]


def speech_coverage(speech: Iterable[Interval], segments: Iterable[Sequence[Interval]]) -> float | None:
    """Share of the speech time covered by words; None when there is no speech at all."""
    base = union(speech)
    spoken = total(base)
    if spoken <= 0:
        return None
    left = subtract(base, word_cover(segments))
    return round(max(0.0, 1.0 - total(left) / spoken), 4)


def explain(stretches: Sequence[Interval], reasons: Sequence[Gap], default: str) -> list[Gap]:
    """A Gap per stretch, with the reason (from the transcription) that overlaps it most, else ``default``."""
    out: list[Gap] = []
    for a, b in stretches:
        best, why = 0.0, default
        for r in reasons:
            ov = min(b, r.end) - max(a, r.start)
            if ov > best:
                best, why = ov, r.why
        out.append(Gap(a, b, why))
    return out


def coverage_metadata(
    result: dict[str, Any], transcript_gaps: Sequence[dict[str, Any]], second_pass: dict[str, Any]
) -> dict[str, Any]:
    """``speech_coverage`` (share of the diarized speech with words), ``gaps`` (each stretch of it
    without words, and why) and ``second_pass`` for a result's metadata, plus ``coverage_note``
    when the coverage is low (the caller moves it to the notes)."""
    speech = [(t["start"], t["end"]) for t in result["diarization"]]
    words = [[(w["start"], w["end"]) for w in s["words"]] for s in result["segments"]]
    reasons = [Gap(g["start"], g["end"], g["why"]) for g in transcript_gaps]
    gaps = explain(uncovered(speech, words), reasons, "no words: the transcription timed none here")
    coverage = speech_coverage(speech, words)
    out: dict[str, Any] = {
        "speech_coverage": coverage,
        "gaps": [g.to_dict() for g in gaps],
        "second_pass": dict(second_pass),
    }
    if coverage is not None and coverage < LOW_COVERAGE:
        lost = round(sum(g.end - g.start for g in gaps), 1)
        out["coverage_note"] = (
            f"low speech coverage: {coverage:.0%} of the speech the diarization found has words; "
            f"{len(gaps)} stretches ({lost} s) have none (metadata.gaps says why)"
        )
    return out
