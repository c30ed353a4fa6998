"""Who said what: speaker per word and per segment, and the summary (the exports are ``pipeline.exports``).

Word → speaker is a monotonic alignment of the words to the diarization's exclusive
turns (one speaker at a time, overlapped speech to the dominant speaker): words keep
their order, each goes to the turn it overlaps most unless that costs less elsewhere,
a speaker change prefers a sentence end, and a turn left without any word (the
diarization heard someone speak there) draws the words timed just beside it. Whisper's
word times drift by a few tenths of a second at a change of voice (a short "Hello?"
timed into the next turn), which plain per-word overlap hands to the wrong person.
Then a sentence that one speaker clearly dominates takes its stray words; a genuine
mid-sentence change (no speaker dominates, or a run of words of its own) is kept.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.language_rules import LANGUAGE_SCRIPTS, UNSPACED_LANGUAGES, scripts_of

SENTENCE_END = (".", "?", "!", "。", "？", "！")
MAX_GAP_S = 1.5  # a pause this long starts a new segment
MAX_SEGMENT_S = 30.0  # long monologues are split at a sentence end after this
SENTENCE_DOMINANCE = 0.7  # a speaker holding this share of a sentence takes its stray words...
# ...but not a run of another speaker's words this long: ASR often drops the full stop at a
# speaker change ("...that matches what we have to..."), and such a "sentence" holds two turns
KEEP_RUN_S = 1.0
KEEP_RUN_WORDS = 3
# The monotonic alignment (assign_word_speakers): costs are in seconds of a word's time
# outside its turn. Chosen on the evaluation set plus six make_conversation.py calls not used
# for anything else (bench/README.md): the largest cpWER - WER stays the same or falls on each
# for 0.25 <= EMPTY_TURN_COST <= 1 and 0.3 <= CHANGE_COST <= 0.6.
EMPTY_TURN_COST = 0.5  # per second of a turn that gets no word...
EMPTY_TURN_CAP_S = 1.0  # ...counting at most this much of it: only words timed close by are drawn in
CHANGE_COST = 0.5  # a speaker change after a word that does not end a sentence
REACH_S = 2.0  # turns this far from a word are its candidates (else only the nearest turn)


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
    language: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "start": self.start,
            "end": self.end,
            "speaker": self.speaker,
            "language": self.language,
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


@dataclass
class _Run:
    """Consecutive turns of one speaker."""

    start: float
    end: float
    speaker: str


def _runs(turns: Sequence[TurnLike]) -> list[_Run]:
    runs: list[_Run] = []
    for t in sorted(turns, key=lambda t: (t.start, t.end)):
        if runs and runs[-1].speaker == t.speaker:
            runs[-1].end = max(runs[-1].end, t.end)
        else:
            runs.append(_Run(t.start, t.end, t.speaker))
    return runs


def _span(w: Any) -> tuple[float, float]:
    """A word's time; zero-length words are widened a little so that they overlap something."""
    if w.end - w.start >= 0.02:
        return w.start, w.end
    mid = (w.start + w.end) / 2
    return mid - 0.05, mid + 0.05


def _outside(a: float, b: float, run: _Run) -> float:
    """Seconds of [a, b] outside ``run``, plus its distance from ``run`` when apart."""
    inside = max(0.0, min(b, run.end) - max(a, run.start))
    return (b - a) - inside + max(0.0, run.start - b, a - run.end)


def assign_word_speakers(
    words: Sequence[Any], exclusive_turns: Sequence[TurnLike], turns: Sequence[TurnLike]
) -> list[WordOut]:
    """Speaker per word (words have .word/.start/.end/.score, in time order): the cheapest
    monotonic alignment of words to speaker runs (see the module's docstring), then
    sentence-level smoothing. ``turns`` (which may overlap) serve when there are no
    exclusive turns."""
    runs = _runs(exclusive_turns or turns)
    if not runs:
        return [WordOut(w.word, w.start, w.end, None, w.score) for w in words]
    chosen = _align_to_runs(words, runs)
    out = [WordOut(w.word, w.start, w.end, runs[k].speaker, w.score) for w, k in zip(words, chosen, strict=True)]
    _smooth_sentences(out, _TurnIndex(exclusive_turns or turns))
    return out


def _align_to_runs(words: Sequence[Any], runs: list[_Run]) -> list[int]:
    """Index into ``runs`` per word, non-decreasing, minimising the words' time outside their
    run + EMPTY_TURN_COST per (capped) second of runs skipped between two words + CHANGE_COST
    per change after a word that does not end a sentence. Viterbi over each word's candidate
    runs (those within REACH_S): O(words x candidates^2)."""
    starts = [r.start for r in runs]
    reach_ends = list(itertools.accumulate((r.end for r in runs), max))  # non-decreasing
    skipped = [0.0, *itertools.accumulate(min(r.end - r.start, EMPTY_TURN_CAP_S) for r in runs)]

    def candidates(a: float, b: float) -> list[int]:
        lo = bisect.bisect_left(reach_ends, a - REACH_S)
        hi = bisect.bisect_right(starts, b + REACH_S)
        near = list(range(lo, hi))
        return near or [min(range(max(0, lo - 1), min(len(runs), lo + 1)), key=lambda k: _outside(a, b, runs[k]))]

    back: list[dict[int, int]] = []
    cost: dict[int, float] = {}
    for i, w in enumerate(words):
        a, b = _span(w)
        step: dict[int, float] = {}
        links: dict[int, int] = {}
        ends_sentence = i > 0 and words[i - 1].word.endswith(SENTENCE_END)
        for k in candidates(a, b):
            here = _outside(a, b, runs[k])
            if not cost:
                step[k], links[k] = here, k
                continue
            best, arg = math.inf, -1
            for k0, c0 in cost.items():
                if k0 > k:
                    continue
                c = c0 + EMPTY_TURN_COST * (skipped[k] - skipped[k0 + 1] if k > k0 + 1 else 0.0)
                if k0 != k and not ends_sentence:
                    c += CHANGE_COST
                if c < best:
                    best, arg = c, k0
            if arg < 0:  # no earlier run among the previous word's candidates: a word timed out of order
                arg = min(cost, key=cost.__getitem__)
                best = cost[arg] + REACH_S
            step[k], links[k] = best + here, arg
        cost = step
        back.append(links)
    if not cost:
        return []
    k = min(cost, key=cost.__getitem__)
    chosen = [0] * len(words)
    for i in range(len(words) - 1, -1, -1):
        chosen[i] = k
        k = back[i][k]
    return chosen


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


# A run of at least this many words, none of them in the script of the language they were decoded
# as, all in the script of exactly one other language of the recording, is labelled that language
# (one or two such words are kept: an acronym or a name inside a sentence).
SCRIPT_RUN_MIN_WORDS = 3


def languages_by_script(texts: Sequence[str], langs: Sequence[str], recording: Sequence[str]) -> list[str]:
    """Each word's language, corrected where its script contradicts it.

    A chunk is decoded as one language, but one that holds the end of one language and the start
    of another can still be decoded in both (Whisper writes what it hears): its words keep the
    chunk's label. Where a long enough run of words is written in the script of another language
    the recording was identified in (``recording``), that run takes that language.
    """
    out = list(langs)

    def foreign(i: int) -> str | None:
        own = LANGUAGE_SCRIPTS.get(out[i])
        scripts = scripts_of(texts[i])
        if own is None or not scripts or scripts & own:
            return None
        fits = [lang for lang in recording if lang != out[i] and scripts <= LANGUAGE_SCRIPTS.get(lang, frozenset())]
        return fits[0] if len(fits) == 1 else None

    i = 0
    while i < len(out):
        target = foreign(i)
        j = i + 1
        if target is not None:
            # the run: words of the same label and the same foreign language; wordless tokens
            # (digits, punctuation) inside it join it
            while j < len(out) and out[j] == out[i] and (foreign(j) == target or not scripts_of(texts[j])):
                j += 1
            if sum(1 for k in range(i, j) if scripts_of(texts[k])) >= SCRIPT_RUN_MIN_WORDS:
                out[i:j] = [target] * (j - i)
        i = j
    return out


def build_segments(words: Sequence[WordOut], languages: Sequence[str | None] | None = None) -> list[SegmentOut]:
    """Group words into segments: split at speaker changes, language changes (``languages``: one
    per word), long pauses, and long monologues. Words of languages written without spaces join
    without them."""
    segments: list[SegmentOut] = []
    cur: list[WordOut] = []
    langs = list(languages) if languages is not None else [None] * len(words)
    cur_lang: list[str | None] = [None]

    def flush() -> None:
        if cur:
            sep = "" if cur_lang[0] in UNSPACED_LANGUAGES else " "
            segments.append(
                SegmentOut(
                    id=len(segments),
                    start=round(cur[0].start, 3),
                    end=round(max(w.end for w in cur), 3),
                    speaker=cur[0].speaker,
                    text=sep.join(w.word for w in cur),
                    words=list(cur),
                    language=cur_lang[0],
                )
            )
            cur.clear()

    for w, lang in zip(words, langs, strict=True):
        if cur:
            prev = cur[-1]
            new_speaker = w.speaker != prev.speaker or lang != cur_lang[0]
            long_pause = w.start - prev.end > MAX_GAP_S
            too_long = w.end - cur[0].start > MAX_SEGMENT_S and prev.word.endswith(SENTENCE_END)
            if new_speaker or long_pause or too_long:
                flush()
        cur.append(w)
        cur_lang[0] = lang
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


# --- the result document --------------------------------------------------


def assemble(
    alignment: Any,
    diarization: Any,
    tracks: Any,
    *,
    duration: float,
    language: str,
    language_probability: float | None = None,
    languages: dict[str, float] | None = None,
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
    # one language per word, from the transcript segment it came from (words keep their order)
    word_languages = [s.language or language for s in alignment.segments for _ in s.words]
    word_languages = languages_by_script([w.word for w in words], word_languages, list(languages or {}))
    segments = build_segments(words, word_languages)
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
            "language_probability": language_probability,  # None: requested, not identified
            "languages": dict(languages or {}),  # seconds of speech decoded as each language
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
