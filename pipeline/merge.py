"""Who said what: speaker per word and per segment, the summary, and the exports.

Word → speaker is decided by time overlap with the diarization (exclusive
turns first, so overlapped speech goes to the dominant speaker), then smoothed
per sentence: Whisper's word times jitter by a tenth of a second, which at a
speaker change would otherwise hand the first or last word of a sentence to
the wrong person. A sentence keeps a genuine mid-sentence change when no
speaker clearly dominates it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

SENTENCE_END = (".", "?", "!", "。", "？", "！")
MAX_GAP_S = 1.5  # a pause this long starts a new segment
MAX_SEGMENT_S = 30.0  # long monologues are split at a sentence end after this
SENTENCE_DOMINANCE = 0.7  # a speaker holding this share of a sentence takes its stray words...
# ...but not a run of another speaker's words this long: ASR often drops the full stop at a
# speaker change ("...that matches what we have to..."), and such a "sentence" holds two turns
KEEP_RUN_S = 1.0
KEEP_RUN_WORDS = 3
NEAREST_TURN_S = 1.0  # a word outside every turn goes to a turn this close


class TurnLike(Protocol):
    start: float
    end: float
    speaker: str


@dataclass
class WordOut:
    word: str
    start: float
    end: float
    speaker: str | None
    score: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"word": self.word, "start": self.start, "end": self.end, "speaker": self.speaker, "score": self.score}


@dataclass
class SegmentOut:
    id: int
    start: float
    end: float
    speaker: str | None
    text: str
    words: list[WordOut]
    features: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "start": self.start,
            "end": self.end,
            "speaker": self.speaker,
            "text": self.text,
            "words": [w.to_dict() for w in self.words],
            "features": self.features,
        }


class _TurnIndex:
    """Turns sorted by start, for overlap queries in O(log n + k)."""

    def __init__(self, turns: Sequence[TurnLike]) -> None:
        self.turns = sorted(turns, key=lambda t: (t.start, t.end))
        self.starts = [t.start for t in self.turns]
        longest = max((t.end - t.start for t in self.turns), default=0.0)
        self.longest = longest

    def overlaps(self, start: float, end: float) -> dict[str, float]:
        out: dict[str, float] = {}
        lo = bisect.bisect_left(self.starts, start - self.longest)
        hi = bisect.bisect_right(self.starts, end)
        for t in self.turns[lo:hi]:
            ov = min(end, t.end) - max(start, t.start)
            if ov > 0:
                out[t.speaker] = out.get(t.speaker, 0.0) + ov
        return out

    def nearest(self, time: float, within: float) -> str | None:
        best, best_d = None, within
        lo = bisect.bisect_left(self.starts, time - self.longest - within)
        hi = bisect.bisect_right(self.starts, time + within)
        for t in self.turns[lo:hi]:
            d = 0.0 if t.start <= time <= t.end else min(abs(time - t.start), abs(time - t.end))
            if d <= best_d:
                best, best_d = t.speaker, d
        return best


def assign_word_speakers(
    words: Sequence[Any], exclusive_turns: Sequence[TurnLike], turns: Sequence[TurnLike]
) -> list[WordOut]:
    """Speaker per word (words have .word/.start/.end/.score), then sentence-level smoothing."""
    excl, raw = _TurnIndex(exclusive_turns), _TurnIndex(turns)
    out: list[WordOut] = []
    for w in words:
        mid = (w.start + w.end) / 2
        # zero-length words still need a speaker: widen them a little
        a, b = (w.start, w.end) if w.end - w.start >= 0.02 else (mid - 0.05, mid + 0.05)
        ov = excl.overlaps(a, b) or raw.overlaps(a, b)
        speaker = max(ov.items(), key=lambda kv: kv[1])[0] if ov else excl.nearest(mid, NEAREST_TURN_S)
        if speaker is None:
            speaker = raw.nearest(mid, float("inf"))
        out.append(WordOut(word=w.word, start=w.start, end=w.end, speaker=speaker, score=w.score))
    _smooth_sentences(out, excl)
    return out


def _sentences(words: Sequence[WordOut]) -> list[list[int]]:
    groups: list[list[int]] = []
    cur: list[int] = []
    for i, w in enumerate(words):
        if cur and w.start - words[cur[-1]].end > MAX_GAP_S:
            groups.append(cur)
            cur = []
        cur.append(i)
        if w.word.endswith(SENTENCE_END):
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    return groups


def _smooth_sentences(words: list[WordOut], excl: _TurnIndex) -> None:
    for idx in _sentences(words):
        if len(idx) < 2:
            continue
        start, end = words[idx[0]].start, words[idx[-1]].end
        share = excl.overlaps(start, end)
        if not share:
            continue
        total = sum(share.values())
        top, top_t = max(share.items(), key=lambda kv: kv[1])
        if total > 0 and top_t / total >= SENTENCE_DOMINANCE:
            for run in _speaker_runs(words, idx):
                first, last = words[run[0]], words[run[-1]]
                genuine = len(run) >= KEEP_RUN_WORDS and last.end - first.start >= KEEP_RUN_S
                if first.speaker != top and not genuine:
                    for i in run:
                        words[i].speaker = top


def _speaker_runs(words: Sequence[WordOut], idx: list[int]) -> list[list[int]]:
    """``idx`` split where the speaker changes."""
    runs: list[list[int]] = []
    for i in idx:
        if runs and words[runs[-1][-1]].speaker == words[i].speaker:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def build_segments(words: Sequence[WordOut]) -> list[SegmentOut]:
    """Group words into segments: split at speaker changes, long pauses, and long monologues."""
    segments: list[SegmentOut] = []
    cur: list[WordOut] = []

    def flush() -> None:
        if cur:
            segments.append(
                SegmentOut(
                    id=len(segments),
                    start=round(cur[0].start, 3),
                    end=round(max(w.end for w in cur), 3),
                    speaker=cur[0].speaker,
                    text=" ".join(w.word for w in cur),
                    words=list(cur),
                )
            )
            cur.clear()

    for w in words:
        if cur:
            prev = cur[-1]
            new_speaker = w.speaker != prev.speaker
            long_pause = w.start - prev.end > MAX_GAP_S
            too_long = w.end - cur[0].start > MAX_SEGMENT_S and prev.word.endswith(SENTENCE_END)
            if new_speaker or long_pause or too_long:
                flush()
        cur.append(w)
    flush()
    return segments


def relabel_speakers(turns: Sequence[TurnLike]) -> dict[str, str]:
    """SPEAKER_00 is whoever speaks first, SPEAKER_01 next, and so on."""
    order: dict[str, str] = {}
    for t in sorted(turns, key=lambda t: t.start):
        if t.speaker not in order:
            order[t.speaker] = f"SPEAKER_{len(order):02d}"
    return order


def speaker_summary(segments: Sequence[SegmentOut], turns: Sequence[TurnLike]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for t in turns:
        s = summary.setdefault(t.speaker, {"total_duration": 0.0, "segment_count": 0, "word_count": 0})
        s["total_duration"] += t.end - t.start
    for seg in segments:
        if seg.speaker is None:
            continue
        s = summary.setdefault(seg.speaker, {"total_duration": 0.0, "segment_count": 0, "word_count": 0})
        s["segment_count"] += 1
        s["word_count"] += len(seg.words)
    for s in summary.values():
        s["total_duration"] = round(s["total_duration"], 3)
    return dict(sorted(summary.items()))


# --- exports --------------------------------------------------------------


def _clock(t: float, sep: str) -> str:
    ms = int(round(t * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(segments: Sequence[dict[str, Any]]) -> str:
    blocks = []
    for i, s in enumerate(segments, 1):
        who = f"[{s['speaker']}] " if s.get("speaker") else ""
        blocks.append(f"{i}\n{_clock(s['start'], ',')} --> {_clock(s['end'], ',')}\n{who}{s['text']}\n")
    return "\n".join(blocks)


def to_vtt(segments: Sequence[dict[str, Any]]) -> str:
    blocks = ["WEBVTT\n"]
    for s in segments:
        text = s["text"].replace("-->", "->")
        who = f"<v {s['speaker']}>" if s.get("speaker") else ""
        blocks.append(f"{_clock(s['start'], '.')} --> {_clock(s['end'], '.')}\n{who}{text}\n")
    return "\n".join(blocks)


def to_rttm(turns: Sequence[dict[str, Any]], file_id: str) -> str:
    uri = "".join(c if c.isalnum() or c in "._-" else "_" for c in file_id) or "audio"
    return "".join(
        f"SPEAKER {uri} 1 {t['start']:.3f} {t['end'] - t['start']:.3f} <NA> <NA> {t['speaker']} <NA> <NA>\n"
        for t in turns
    )


# --- the result document --------------------------------------------------


def assemble(
    alignment: Any,
    diarization: Any,
    tracks: Any,
    *,
    duration: float,
    language: str,
    models: dict[str, Any],
    device: str,
    stage_times: dict[str, float],
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """The ``result`` object of the job document (what ``score.py`` and the backend read)."""
    from pipeline.features import segment_features

    names = relabel_speakers(diarization.turns)

    @dataclass
    class _Turn:
        start: float
        end: float
        speaker: str

    turns = [_Turn(t.start, t.end, names.get(t.speaker, t.speaker)) for t in diarization.turns]
    excl = [_Turn(t.start, t.end, names.get(t.speaker, t.speaker)) for t in diarization.exclusive_turns]
    words = assign_word_speakers(alignment.words, excl, turns)
    segments = build_segments(words)
    for seg in segments:
        seg.features = segment_features(tracks, seg.start, seg.end, len(seg.words))
    seg_dicts = [s.to_dict() for s in segments]
    diar_dicts = [{"start": round(t.start, 3), "end": round(t.end, 3), "speaker": t.speaker} for t in turns]
    speakers = speaker_summary(segments, turns)
    return {
        "segments": seg_dicts,
        "diarization": diar_dicts,
        "speakers": speakers,
        "metadata": {
            "duration": round(duration, 3),
            "language": language,
            "models": models,
            "alignment_method": alignment.method,
            "device": device,
            "processing_time": round(sum(stage_times.values()), 3),
            "stage_times": stage_times,
            "speakers_detected": len(speakers),
            "segments_created": len(seg_dicts),
            "words": len(words),
            "notes": list(notes),
        },
    }


def exports(result: dict[str, Any], job_id: str) -> dict[str, str]:
    """SRT, VTT and RTTM renderings of a result."""
    return {
        "srt": to_srt(result["segments"]),
        "vtt": to_vtt(result["segments"]),
        "rttm": to_rttm(result["diarization"], job_id),
    }
