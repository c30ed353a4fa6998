"""What diarization returns: speaker turns, raw and exclusive, speakers named in order of first speech."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SpeakerTurn:
    start: float
    end: float
    speaker: str


@dataclass
class DiarizationResult:
    turns: list[SpeakerTurn]
    """Raw turns, sorted by start; they may overlap (overlapped speech keeps both speakers)."""
    exclusive_turns: list[SpeakerTurn]
    """At most one speaker at any time (for assigning words to speakers)."""
    num_speakers: int
    voiceprints: dict[str, list[float]] = field(default_factory=dict)
    """Each speaker's voice: the unit-length mean of the diarization's own CAM++ embeddings of
    them (what speaker identification compares with enrolled voices); missing for a speaker
    the clustering did not describe."""
    speakers: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.speakers = sorted({t.speaker for t in self.turns})

    def to_dict(self) -> dict[str, Any]:
        return {
            "turns": [_turn_dict(t) for t in self.turns],
            "exclusive_turns": [_turn_dict(t) for t in self.exclusive_turns],
            "num_speakers": self.num_speakers,
            "voiceprints": self.voiceprints,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DiarizationResult:
        return cls(
            turns=[SpeakerTurn(float(t["start"]), float(t["end"]), str(t["speaker"])) for t in d["turns"]],
            exclusive_turns=[
                SpeakerTurn(float(t["start"]), float(t["end"]), str(t["speaker"])) for t in d.get("exclusive_turns", [])
            ],
            num_speakers=int(d["num_speakers"]),
            voiceprints={str(k): [float(x) for x in v] for k, v in (d.get("voiceprints") or {}).items()},
        )


def _turn_dict(turn: SpeakerTurn) -> dict[str, Any]:
    return {"start": turn.start, "end": turn.end, "speaker": turn.speaker}


def to_result(
    annotation: Any, exclusive: Any | None, voiceprints: Mapping[str, Any] | None = None
) -> DiarizationResult:
    """Rename speakers SPEAKER_00, SPEAKER_01, ... in order of first speech."""
    raw = [(seg.start, seg.end, str(label)) for seg, _, label in annotation.itertracks(yield_label=True)]
    exclusive_raw = (
        None
        if exclusive is None
        else [(seg.start, seg.end, str(label)) for seg, _, label in exclusive.itertracks(yield_label=True)]
    )
    return result_from_raw(raw, exclusive_raw, voiceprints)


def result_from_raw(
    raw: list[tuple[float, float, str]],
    exclusive_raw: list[tuple[float, float, str]] | None,
    voiceprints: Mapping[str, Any] | None = None,
) -> DiarizationResult:
    """Turns as (start, end, label) into a result, speakers renamed in order of first speech;
    ``voiceprints`` (by the same labels: vectors, any length) become unit-length lists."""
    raw = sorted(raw)
    order: dict[str, str] = {}
    for _, _, label in raw:
        order.setdefault(label, f"SPEAKER_{len(order):02d}")

    def turns(items: list[tuple[float, float, str]]) -> list[SpeakerTurn]:
        return [
            SpeakerTurn(round(start, 3), round(end, 3), order[label])
            for start, end, label in sorted(items)
            if end > start and label in order
        ]

    if exclusive_raw is None:
        exclusive_raw = exclusive_turns(raw)
    return DiarizationResult(
        turns=turns(raw),
        exclusive_turns=turns(exclusive_raw),
        num_speakers=len(order),
        voiceprints={order[k]: unit_list(v) for k, v in (voiceprints or {}).items() if k in order and unit_list(v)},
    )


def unit_list(vector: Any) -> list[float]:
    """``vector`` scaled to unit length, as a list of floats rounded to 5 decimals (JSON-sized);
    empty for a missing, zero or non-finite vector."""
    if vector is None:
        return []
    values = [float(x) for x in vector]
    norm = math.sqrt(sum(x * x for x in values))
    if not values or not math.isfinite(norm) or norm == 0.0:
        return []
    return [round(x / norm, 5) for x in values]


def exclusive_turns(raw: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """At most one speaker at a time, for pipelines that do not give exclusive turns:
    where turns overlap, whoever was speaking first keeps the floor."""
    out: list[tuple[float, float, str]] = []
    for start, end, label in sorted(raw):
        if out and start < out[-1][1]:
            start = out[-1][1]
        if end > start:
            if out and out[-1][2] == label and abs(out[-1][1] - start) < 1e-6:
                out[-1] = (out[-1][0], end, label)
            else:
                out.append((start, end, label))
    return out
