"""What a live session emits, as the WebSocket contract names it (README, ``WS /v1/stream``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TimedWord:
    """A word with absolute times (seconds from the start of the stream). ``text`` keeps Whisper's
    leading space, so that joining words gives the text back."""

    start: float
    end: float
    text: str
    probability: float | None = None


@dataclass(frozen=True)
class Partial:
    """The words of the current utterance so far: may still change."""

    text: str
    start: float
    end: float

    def to_message(self) -> dict[str, Any]:
        return {"type": "partial", "text": self.text, "start": self.start, "end": self.end}


@dataclass
class Final:
    """An utterance that will never change, except its speaker (``SpeakerUpdate``)."""

    id: int
    start: float
    end: float
    text: str
    language: str
    words: list[TimedWord] = field(default_factory=list)
    speaker: str | None = None

    def to_message(self) -> dict[str, Any]:
        return {
            "type": "final",
            "id": self.id,
            "start": self.start,
            "end": self.end,
            "text": self.text,
            "speaker": self.speaker,
            "language": self.language,
            "words": [
                {"word": w.text, "start": w.start, "end": w.end, "probability": w.probability} for w in self.words
            ],
        }


@dataclass(frozen=True)
class SpeakerUpdate:
    """An earlier final relabelled: the online clustering found two of its speakers to be one."""

    id: int
    speaker: str

    def to_message(self) -> dict[str, Any]:
        return {"type": "speaker_update", "id": self.id, "speaker": self.speaker}


Event = Partial | Final | SpeakerUpdate


def join_words(words: list[TimedWord]) -> str:
    return "".join(w.text for w in words).strip()
