"""A finished job's result as files: SRT, WebVTT, RTTM (rendered by ``pipeline.exports``, the one
definition the workers also write to disk) and a plain-text transcript."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

ExportFormat = Literal["srt", "vtt", "rttm", "txt"]


@dataclass(frozen=True)
class Export:
    media_type: str
    text: str


MEDIA_TYPES: dict[str, str] = {
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "rttm": "text/plain; charset=utf-8",  # RTTM has no registered media type
    "txt": "text/plain; charset=utf-8",
}


def _clock(t: float) -> str:
    s = int(t)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def to_txt(segments: list[dict[str, Any]]) -> str:
    """One line per segment: ``[00:01:02] SPEAKER_00: text`` (no speaker label where none was found)."""
    lines = []
    for s in segments:
        who = f"{s.get('speaker_name') or s['speaker']}: " if s.get("speaker") else ""
        lines.append(f"[{_clock(float(s['start']))}] {who}{s['text'].strip()}")
    return "\n".join(lines) + ("\n" if lines else "")


def render(result: dict[str, Any], job_id: str, fmt: ExportFormat) -> Export:
    from pipeline.exports import exports  # torch-free: string formatting over the result document

    text = to_txt(result.get("segments", [])) if fmt == "txt" else exports(result, job_id)[fmt]
    return Export(MEDIA_TYPES[fmt], text)
