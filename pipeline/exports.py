"""A result as files: SRT and WebVTT subtitles and RTTM speaker turns, the one rendering that the
workers write to disk and the shim, the command line and the OpenAI-compatible route serve.

Torch-free: string formatting over the result document.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pipeline.speech_types import CHARACTER_SUBTITLE_LANGUAGES, UNSPACED_LANGUAGES


def _clock(t: float, sep: str) -> str:
    ms = int(round(t * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


# Subtitle cues for Korean, Japanese and Chinese: a cue holds at most this many characters and
# lasts at most this long (Netflix's timed-text guides: 16 characters a line for Korean and
# Chinese, 13 for Japanese; 7 s a cue). Words in these languages are long (a Korean eojeol) or
# single characters (Japanese, Chinese), so lines are cut by characters, not after N words.
CUE_MAX_CHARS = {"ko": 16, "ja": 13, "zh": 16, "yue": 16}
CUE_MAX_S = 7.0


def _cues(segment: dict[str, Any]) -> list[tuple[float, float, str]]:
    """(start, end, text) per subtitle cue: the whole segment, or for a language in
    CHARACTER_SUBTITLE_LANGUAGES pieces cut by characters and duration at word times."""
    lang = segment.get("language")
    words = segment.get("words") or []
    if lang not in CHARACTER_SUBTITLE_LANGUAGES or not words:
        return [(segment["start"], segment["end"], segment["text"])]
    limit, sep = CUE_MAX_CHARS.get(lang, 16), ("" if lang in UNSPACED_LANGUAGES else " ")
    pieces: list[tuple[float, float, str]] = []  # one per word, long words cut into limit-sized parts
    for w in words:
        text, start, end = w["word"], w["start"], w["end"]
        n = max(1, math.ceil(len(text) / limit))
        step = (end - start) / n
        pieces += [(start + k * step, start + (k + 1) * step, text[k * limit : (k + 1) * limit]) for k in range(n)]
    cues: list[tuple[float, float, str]] = []
    cur: list[tuple[float, float, str]] = []
    for p in pieces:
        if cur and (len(sep.join(t for _, _, t in cur + [p])) > limit or p[1] - cur[0][0] > CUE_MAX_S):
            cues.append((cur[0][0], cur[-1][1], sep.join(t for _, _, t in cur)))
            cur = []
        cur.append(p)
    if cur:
        cues.append((cur[0][0], cur[-1][1], sep.join(t for _, _, t in cur)))
    return cues


def to_srt(segments: Sequence[dict[str, Any]]) -> str:
    blocks: list[str] = []
    for s in segments:
        who = f"[{s['speaker']}] " if s.get("speaker") else ""
        for start, end, text in _cues(s):
            n = len(blocks) + 1
            blocks.append(f"{n}\n{_clock(start, ',')} --> {_clock(end, ',')}\n{who}{text}\n")
    return "\n".join(blocks)


def to_vtt(segments: Sequence[dict[str, Any]]) -> str:
    blocks = ["WEBVTT\n"]
    for s in segments:
        who = f"<v {s['speaker']}>" if s.get("speaker") else ""
        for start, end, text in _cues(s):
            blocks.append(f"{_clock(start, '.')} --> {_clock(end, '.')}\n{who}{text.replace('-->', '->')}\n")
    return "\n".join(blocks)


def to_rttm(turns: Sequence[dict[str, Any]], file_id: str) -> str:
    uri = "".join(c if c.isalnum() or c in "._-" else "_" for c in file_id) or "audio"
    return "".join(
        f"SPEAKER {uri} 1 {t['start']:.3f} {t['end'] - t['start']:.3f} <NA> <NA> {t['speaker']} <NA> <NA>\n"
        for t in turns
    )


def exports(result: dict[str, Any], job_id: str) -> dict[str, str]:
    """SRT, VTT and RTTM renderings of a result."""
    return {
        "srt": to_srt(result["segments"]),
        "vtt": to_vtt(result["segments"]),
        "rttm": to_rttm(result["diarization"], job_id),
    }
