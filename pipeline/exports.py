"""A result as files: SRT and WebVTT subtitles and RTTM speaker turns, the one rendering that the
workers write to disk and the shim, the command line and the OpenAI-compatible route serve.

Subtitles are laid out per language the way subtitle guides ask (Netflix's Timed Text Style
Guides, the most cited public ones): at most so many characters a line and two lines a cue, at
most 7 s a cue, a reading speed the viewer can follow. A segment longer than one cue becomes
several, cut at its words' times (``cues``): the cut points are chosen over the whole segment
(sentence ends first, then clause punctuation and pauses; cues of similar size), a new speaker
always starts a new cue (segments already end at a change of speaker), and lines are broken
between words only, balanced. Where the speech allows, a cue stays up after its last word until
its text can be read at the guide's speed (never past the next cue, never longer than 7 s).

Torch-free: string formatting over the result document.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import UnsupportedOptionError
from pipeline.language_rules import UNSPACED_LANGUAGES

# (characters a line, characters a second) per language, from Netflix's Timed Text Style Guides:
# English template: 42 a line, 17 cps for adult programmes (the English (USA) guide allows 20;
# the template's 17 is the figure other languages are timed from); Korean: 16 a line, 12 cps;
# Japanese: 13 full-width characters a line (horizontal), 4 cps; Simplified and Traditional
# Chinese: 16 a line, 9 cps. Other languages get the English figures (42 a line, and 17 cps is
# what most Latin-script guides give for adult programmes). Line lengths count every character
# (the Korean guide counts Latin letters, spaces and punctuation as half: counting them whole is
# stricter, never longer).
GUIDES: dict[str, tuple[int, float]] = {"en": (42, 17.0), "ko": (16, 12.0), "ja": (13, 4.0), "zh": (16, 9.0)}
GUIDES["yue"] = GUIDES["zh"]
DEFAULT_GUIDE = GUIDES["en"]
MAX_LINES = 2  # every guide: two lines at most
MAX_CUE_S = 7.0  # General Requirements: 7 s at most per subtitle event...
MIN_CUE_S = 5 / 6  # ...and at least five-sixths of a second, where the next cue leaves room
FRAME_GAP_S = 2 / 24  # two frames between cues (at 24 fps)

# what a job may override (options.subtitles), and the range each may take
SUBTITLE_OPTIONS: dict[str, tuple[type, float, float]] = {
    "max_chars_per_line": (int, 8, 120),
    "max_lines": (int, 1, 4),
    "max_cue_s": (float, 1.0, 30.0),
}

SENTENCE_END = (".", "?", "!", "。", "？", "！", "…")
CLAUSE_END = (",", ";", ":", "、", "，", "；", "：", "—")
# English words a line or a cue should not end on (the guide breaks before a conjunction or a
# preposition, and never between an article and its noun)
WEAK_ENDINGS = frozenset(
    "a an the of to in on at by for from with and or but nor so that as if than into onto my your his her "
    "its our their this these those is are was were be been i we you he she they it".split()
)


@dataclass(frozen=True)
class Layout:
    max_chars_per_line: int
    max_lines: int
    max_cue_s: float
    max_cps: float
    joiner: str  # what goes between two words: a space, or nothing (Japanese, Chinese)


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    speaker: str | None  # the label shown: the segment's speaker_name, else its speaker
    lines: tuple[str, ...]
    language: str | None = None

    @property
    def chars(self) -> int:
        """Characters read (line breaks not counted)."""
        return sum(len(line) for line in self.lines)

    @property
    def cps(self) -> float:
        return self.chars / max(self.end - self.start, 1e-3)


def subtitle_options(options: Mapping[str, Any] | None) -> dict[str, int | float]:
    """A job's ``options.subtitles`` checked: only the keys of SUBTITLE_OPTIONS, each a number in
    its range. ``UnsupportedOptionError`` says what is wrong (the shim's schema says the same
    before a job is accepted; this is the command line's and the worker's check)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise UnsupportedOptionError('options.subtitles must be an object such as {"max_chars_per_line": 32}')
    unknown = sorted(set(options) - set(SUBTITLE_OPTIONS))
    if unknown:
        raise UnsupportedOptionError(
            f"options.subtitles has no {', '.join(unknown)}; it takes {', '.join(SUBTITLE_OPTIONS)}"
        )
    out: dict[str, int | float] = {}
    for key, value in options.items():
        if value is None:
            continue
        kind, lo, hi = SUBTITLE_OPTIONS[key]
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or (kind is int and float(value) != int(value)) or not lo <= float(value) <= hi:
            what = "a whole number" if kind is int else "a number"
            raise UnsupportedOptionError(f"options.subtitles.{key} must be {what} from {lo:g} to {hi:g}, not {value!r}")
        out[key] = kind(value)
    return out


def layout_for(language: str | None, overrides: Mapping[str, Any] | None = None) -> Layout:
    """The layout of ``language``'s subtitles, with a job's checked overrides applied."""
    chars, cps = GUIDES.get(language or "", DEFAULT_GUIDE)
    o = subtitle_options(overrides)
    return Layout(
        max_chars_per_line=int(o.get("max_chars_per_line", chars)),
        max_lines=int(o.get("max_lines", MAX_LINES)),
        max_cue_s=float(o.get("max_cue_s", MAX_CUE_S)),
        max_cps=cps,
        joiner="" if language in UNSPACED_LANGUAGES else " ",
    )


# --- words of a segment -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tok:
    text: str
    start: float
    end: float


def _timed(text: str, start: float, end: float, joiner: str) -> list[_Tok]:
    """Words of a segment that has no word times, its time shared out by their length."""
    parts = text.split() if joiner else [c for c in text if not c.isspace()]
    total = sum(len(p) for p in parts) or 1
    out, t = [], start
    for p in parts:
        d = (end - start) * len(p) / total
        out.append(_Tok(p, t, t + d))
        t += d
    return out


def _tokens(segment: Mapping[str, Any], layout: Layout) -> list[_Tok]:
    words = segment.get("words") or []
    timed = all(isinstance(w.get("start"), int | float) and isinstance(w.get("end"), int | float) for w in words)
    if words and timed:
        toks = [_Tok(str(w["word"]).strip(), float(w["start"]), float(w["end"])) for w in words]
        toks = [t for t in toks if t.text]
    else:
        toks = _timed(str(segment.get("text") or ""), float(segment["start"]), float(segment["end"]), layout.joiner)
    # a word longer than a line can only be cut (a URL, a run-on of characters); its time is shared
    limit = layout.max_chars_per_line
    out: list[_Tok] = []
    for t in toks:
        n = math.ceil(len(t.text) / limit)
        step = (t.end - t.start) / max(n, 1)
        out += [
            _Tok(t.text[k * limit : (k + 1) * limit], t.start + k * step, t.start + (k + 1) * step) for k in range(n)
        ]
    return out


def _ends_with(text: str, marks: tuple[str, ...]) -> bool:
    return text.rstrip("\"'”’)」』").endswith(marks)


def _break_cost(left: str, joiner: str) -> float:
    """How bad a break after the word ``left`` is: 0 after a sentence end, more mid-clause, most
    after an article, a preposition or a conjunction."""
    if _ends_with(left, SENTENCE_END):
        return 0.0
    if _ends_with(left, CLAUSE_END):
        return 0.5
    if joiner and left.lower().strip(".,!?\"'") in WEAK_ENDINGS:
        return 1.5
    return 1.0


# --- lines --------------------------------------------------------------------------------------


def _greedy_lines(lengths: Sequence[int], sep: int, limit: int) -> int:
    """The fewest lines ``lengths`` (words, in order) fill, none longer than ``limit``."""
    lines, cur = 1, -sep
    for n in lengths:
        if cur + sep + n <= limit:
            cur += sep + n
        else:
            lines, cur = lines + 1, n
    return lines


def break_lines(words: Sequence[str], layout: Layout) -> tuple[str, ...]:
    """``words`` as the fewest lines that hold them, broken between words only, lines of similar
    length, breaks after punctuation preferred (and not after an article or a conjunction)."""
    sep, limit, joiner = len(layout.joiner), layout.max_chars_per_line, layout.joiner
    lengths = [len(w) for w in words]
    count = _greedy_lines(lengths, sep, limit)
    if count <= 1:
        return (joiner.join(words),)
    n = len(words)
    target = (sum(lengths) + sep * (n - count)) / count
    ends = [0, *itertools.accumulate(lengths)]  # width of words[i:j]: ends[j] - ends[i] + sep * (j - i - 1)
    after = [0.25 * _break_cost(w, joiner) for w in words]  # a line ending on this word
    # best[k][j]: the cheapest way to set words[:j] as k lines; back[k][j]: where the last line starts
    best = [[math.inf] * (n + 1) for _ in range(count + 1)]
    back = [[0] * (n + 1) for _ in range(count + 1)]
    best[0][0] = 0.0
    for k in range(1, count + 1):
        for j in range(1, n + 1):
            for i in range(j - 1, -1, -1):
                w = ends[j] - ends[i] + sep * (j - i - 1)
                if w > limit:
                    break
                if best[k - 1][i] == math.inf:
                    continue
                cost = best[k - 1][i] + ((w - target) / limit) ** 2 * 4 + (after[j - 1] if j < n else 0.0)
                if cost < best[k][j]:
                    best[k][j], back[k][j] = cost, i
    lines: list[str] = []
    j = n
    for k in range(count, 0, -1):
        i = back[k][j]
        lines.append(joiner.join(words[i:j]))
        j = i
    return tuple(reversed(lines))


# --- cues ---------------------------------------------------------------------------------------


def _split_points(toks: Sequence[_Tok], layout: Layout, next_start: float) -> list[int]:
    """Where a segment's words are cut into cues: the cheapest partition (dynamic programming
    over the cut points) into cues that each fit ``layout`` (a single word always fits).
    O(words x words a cue): every cost below is kept up to date as a cue grows by a word."""
    n = len(toks)
    sep, limit = len(layout.joiner), layout.max_chars_per_line
    capacity = limit * layout.max_lines
    # idle[k]: the pauses (beyond 0.8 s, while the text stays up and nobody speaks) before words 1..k-1
    idle = [0.0] * (n + 1)
    for k in range(1, n):
        idle[k + 1] = idle[k] + max(0.0, toks[k].start - toks[k - 1].end - 0.8)
    best = [0.0] + [math.inf] * n
    back = [0] * (n + 1)
    for j in range(1, n + 1):
        following = toks[j].start if j < n else next_start
        cut = 0.0  # how good a cut after word j-1 is: a sentence end, a pause
        if j < n:
            cut = _break_cost(toks[j - 1].text, layout.joiner) - min(max(0.0, following - toks[j - 1].end), 1.0) * 0.5
        chars, lines, width = -sep, 1, -sep  # the cue toks[i:j], its lines filled greedily from its end
        for i in range(j - 1, -1, -1):
            size = len(toks[i].text)
            chars += sep + size
            if width + sep + size <= limit:
                width += sep + size
            else:
                lines, width = lines + 1, size
            span = toks[j - 1].end - toks[i].start
            if i < j - 1 and (span > layout.max_cue_s or chars > capacity or lines > layout.max_lines):
                break
            cost = best[i] + 1.0 + 0.5 * (chars / capacity) ** 2 + cut + (idle[j] - idle[i + 1])
            shown = min(layout.max_cue_s, max(span, following - FRAME_GAP_S - toks[i].start))
            cps = chars / max(shown, 1e-3)
            if cps > layout.max_cps:
                cost += cps / layout.max_cps - 1.0
            if cost < best[j]:
                best[j], back[j] = cost, i
    cuts, j = [], n
    while j > 0:
        cuts.append(j)
        j = back[j]
    return sorted(cuts)


def _label(segment: Mapping[str, Any]) -> str | None:
    name = segment.get("speaker_name") or segment.get("speaker")
    label = " ".join(str(name).split()) if name else ""  # one line: no newline may end the cue early
    return label or None


def cues(segments: Sequence[Mapping[str, Any]], overrides: Mapping[str, Any] | None = None) -> list[Cue]:
    """The subtitle cues of a result's segments (in time order), laid out for each segment's
    language with a job's ``options.subtitles`` applied."""
    subtitle_options(overrides)  # a bad override is refused even where no segment needs it
    ordered = sorted(segments, key=lambda s: (float(s["start"]), float(s["end"])))
    pieces: list[tuple[list[_Tok], Layout, str | None, str | None]] = []
    for s in ordered:
        layout = layout_for(s.get("language"), overrides)
        toks = _tokens(s, layout)
        if toks:
            pieces.append((toks, layout, _label(s), s.get("language")))
    raw: list[tuple[list[_Tok], Layout, str | None, str | None]] = []
    for k, (toks, layout, label, lang) in enumerate(pieces):
        next_start = pieces[k + 1][0][0].start if k + 1 < len(pieces) else math.inf
        i = 0
        for j in _split_points(toks, layout, next_start):
            raw.append((toks[i:j], layout, label, lang))
            i = j
    out: list[Cue] = []
    for k, (toks, layout, label, lang) in enumerate(raw):
        start, spoken_end = toks[0].start, max(t.end for t in toks)
        lines = break_lines([t.text for t in toks], layout)
        chars = sum(len(line) for line in lines)
        # stay up until the text can be read, at least 5/6 s, never into the next cue nor past 7 s
        wanted = start + max(MIN_CUE_S, chars / layout.max_cps)
        room = raw[k + 1][0][0].start - FRAME_GAP_S if k + 1 < len(raw) else math.inf
        end = max(spoken_end, min(wanted, room, start + layout.max_cue_s))
        # to the millisecond, rounded up where the reading time set the end (never into the next cue)
        end = min(math.ceil(end * 1000 - 1e-6) / 1000, max(room, spoken_end)) if end == wanted else end
        out.append(Cue(round(start, 3), round(end, 3), label, lines, lang))
    return out


# --- the formats --------------------------------------------------------------------------------


def _clock(t: float, sep: str) -> str:
    ms = int(round(t * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(segments: Sequence[Mapping[str, Any]], overrides: Mapping[str, Any] | None = None) -> str:
    """SubRip: the speaker's label in brackets before the first line of each cue (the line limits
    count the spoken text, not the label)."""
    blocks: list[str] = []
    for n, c in enumerate(cues(segments, overrides), 1):
        who = f"[{c.speaker}] " if c.speaker else ""
        text = who + "\n".join(c.lines)
        blocks.append(f"{n}\n{_clock(c.start, ',')} --> {_clock(c.end, ',')}\n{text}\n")
    return "\n".join(blocks)


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(segments: Sequence[Mapping[str, Any]], overrides: Mapping[str, Any] | None = None) -> str:
    """WebVTT: the speaker in a voice span (``<v name>``), which players do not count as text."""
    blocks = ["WEBVTT\n"]
    for c in cues(segments, overrides):
        who = f"<v {_vtt_escape(c.speaker)}>" if c.speaker else ""
        text = who + "\n".join(_vtt_escape(line) for line in c.lines)
        blocks.append(f"{_clock(c.start, '.')} --> {_clock(c.end, '.')}\n{text}\n")
    return "\n".join(blocks)


def to_rttm(turns: Sequence[Mapping[str, Any]], file_id: str) -> str:
    uri = "".join(c if c.isalnum() or c in "._-" else "_" for c in file_id) or "audio"
    return "".join(
        f"SPEAKER {uri} 1 {t['start']:.3f} {t['end'] - t['start']:.3f} <NA> <NA> {_rttm_name(t)} <NA> <NA>\n"
        for t in turns
    )


def _rttm_name(turn: Mapping[str, Any]) -> str:
    # the display label (a recognised speaker's name); RTTM's fields are space-separated
    return "_".join(str(turn.get("speaker_name") or turn["speaker"]).split())


def exports(result: Mapping[str, Any], job_id: str) -> dict[str, str]:
    """SRT, VTT and RTTM renderings of a result; the subtitles follow the job's
    ``options.subtitles``, which the result keeps in ``metadata.subtitles``."""
    overrides = (result.get("metadata") or {}).get("subtitles") or None
    return {
        "srt": to_srt(result["segments"], overrides),
        "vtt": to_vtt(result["segments"], overrides),
        "rttm": to_rttm(result["diarization"], job_id),
    }
