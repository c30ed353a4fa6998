"""The transcript and word-timing types that the transcribe and align stages share.

They live here, not in either stage's module, so ``pipeline.transcribe`` (which times words
with ``pipeline.align``'s helper) and ``pipeline.align`` (which reads a ``Transcript``) import
each other's types without importing each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class AsrSegment:
    start: float
    end: float
    text: str
    avg_logprob: float | None = None
    words: list[dict[str, Any]] | None = None  # {word, start, end, score}, absolute seconds
    language: str | None = None  # the language this stretch was decoded as


@dataclass
class Transcript:
    segments: list[AsrSegment]
    language: str  # the language with the most speech
    speech_regions: list[tuple[float, float]] = field(default_factory=list)
    repaired_chunks: int = 0  # chunks re-decoded because batched decoding looped
    language_probability: float | None = None  # None: the language was requested, not detected
    languages: dict[str, float] = field(default_factory=dict)  # language -> seconds of speech decoded as it
    gaps: list[dict[str, Any]] = field(default_factory=list)  # {start, end, why}: speech left without words
    second_pass: dict[str, float] = field(default_factory=dict)  # stretches, seconds, filled: the re-decoding
    language_id_s: float = 0.0  # seconds spent identifying languages (0 when the language was given)

    def to_dict(self) -> dict[str, Any]:
        return {
            "segments": [asdict(s) for s in self.segments],
            "language": self.language,
            "language_probability": self.language_probability,
            "languages": self.languages,
            "speech_regions": [list(r) for r in self.speech_regions],
            "repaired_chunks": self.repaired_chunks,
            "gaps": list(self.gaps),
            "second_pass": dict(self.second_pass),
            "language_id_s": self.language_id_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Transcript:
        return cls(
            segments=[AsrSegment(**s) for s in d["segments"]],
            language=d["language"],
            speech_regions=[(float(a), float(b)) for a, b in d.get("speech_regions", [])],
            repaired_chunks=int(d.get("repaired_chunks", 0)),
            language_probability=d.get("language_probability"),
            languages=dict(d.get("languages") or {}),
            gaps=list(d.get("gaps") or []),
            second_pass=dict(d.get("second_pass") or {}),
            language_id_s=float(d.get("language_id_s") or 0.0),
        )


@dataclass
class Word:
    word: str
    start: float
    end: float
    score: float | None = None


@dataclass
class AlignedSegment:
    start: float
    end: float
    text: str
    words: list[Word]
    language: str | None = None


@dataclass
class Alignment:
    segments: list[AlignedSegment]
    method: str  # "whisper" or "wav2vec2" (or "whisper+wav2vec2" when languages differ)
    model: str | None = None

    @property
    def words(self) -> list[Word]:
        return [w for s in self.segments for w in s.words]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "model": self.model, "segments": [asdict(s) for s in self.segments]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alignment:
        return cls(
            method=d["method"],
            model=d.get("model"),
            segments=[
                AlignedSegment(
                    start=s["start"],
                    end=s["end"],
                    text=s["text"],
                    words=[Word(**w) for w in s["words"]],
                    language=s.get("language"),
                )
                for s in d["segments"]
            ],
        )
