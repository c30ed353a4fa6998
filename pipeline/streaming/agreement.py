"""LocalAgreement-2, as ufal/whisper_streaming runs it (Macháček et al., 2023).

The audio not yet committed is kept in a buffer and decoded again after each new chunk; a word
is committed (it will never change) once two consecutive hypotheses agree on it, in the longest
common prefix after what is already committed. The buffer is trimmed where an utterance was
closed (``trim_at``), so each decoding stays short; Whisper is prompted with the committed text
before the buffer, so it keeps the context across trims.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pipeline.audio import SAMPLE_RATE
from pipeline.streaming.types import TimedWord

PROMPT_CHARS = 200  # the committed text Whisper is prompted with (whisper_streaming's limit)
MAX_NGRAM_OVERLAP = 5  # a new hypothesis may repeat this many committed words at its start
HARD_TRIM_S = 25.0  # a buffer this long is cut at its last committed word, utterance closed or not


class Asr(Protocol):
    """The backend a transcriber drives (``pipeline.streaming.asr.WhisperBackend``)."""

    def transcribe(self, audio: np.ndarray, *, prompt: str, language: str) -> list[TimedWord]:
        """Words of ``audio`` (16 kHz mono float32, at most 30 s), times relative to its start."""
        ...


def _norm(text: str) -> str:
    return text.strip().lower()


class HypothesisBuffer:
    """whisper_streaming's ``HypothesisBuffer``: the committed words, and the last hypothesis of what follows."""

    def __init__(self) -> None:
        self.committed_in_buffer: list[TimedWord] = []
        self.buffer: list[TimedWord] = []  # the previous hypothesis, after the committed words
        self.new: list[TimedWord] = []
        self.last_committed_time = 0.0
        self.last_committed_word: str | None = None

    def insert(self, words: Sequence[TimedWord], offset: float) -> None:
        """A new hypothesis (times relative to ``offset``); words before the last commit are dropped,
        and so are committed words it repeats at its start (a 1- to 5-gram)."""
        shifted = [
            TimedWord(round(w.start + offset, 3), round(w.end + offset, 3), w.text, w.probability) for w in words
        ]
        self.new = [w for w in shifted if w.start > self.last_committed_time - 0.1]
        if not self.new or abs(self.new[0].start - self.last_committed_time) >= 1:
            return
        committed = self.committed_in_buffer
        for n in range(min(len(committed), len(self.new), MAX_NGRAM_OVERLAP), 0, -1):
            tail = [_norm(w.text) for w in committed[-n:]]
            head = [_norm(w.text) for w in self.new[:n]]
            if tail == head:
                del self.new[:n]
                break

    def flush(self) -> list[TimedWord]:
        """Commit the longest common prefix of the previous and the new hypothesis; return it."""
        commit: list[TimedWord] = []
        while self.new and self.buffer and _norm(self.new[0].text) == _norm(self.buffer[0].text):
            word = self.new.pop(0)
            self.buffer.pop(0)
            commit.append(word)
            self.last_committed_time = word.end
            self.last_committed_word = word.text
        self.buffer = self.new
        self.new = []
        self.committed_in_buffer.extend(commit)
        return commit

    def pop_committed(self, time: float) -> None:
        """Forget committed words that end by ``time`` (the buffer was trimmed there)."""
        while self.committed_in_buffer and self.committed_in_buffer[0].end <= time:
            self.committed_in_buffer.pop(0)

    def pending(self) -> list[TimedWord]:
        """The last hypothesis past the committed words: what may still change."""
        return list(self.buffer)


@dataclass
class Step:
    """What one decoding gave: the words committed now, and the hypothesis after them."""

    committed: list[TimedWord]
    pending: list[TimedWord]


class OnlineTranscriber:
    """whisper_streaming's ``OnlineASRProcessor``: ``insert_audio``, ``process_iter``, ``finish``."""

    def __init__(self, asr: Asr, language: str) -> None:
        self.asr = asr
        self.language = language
        self.audio = np.zeros(0, dtype=np.float32)
        self.buffer_offset = 0.0  # seconds of stream before the buffer's first sample
        self.hypothesis = HypothesisBuffer()
        self.committed: list[TimedWord] = []

    @property
    def buffer_end(self) -> float:
        return self.buffer_offset + len(self.audio) / SAMPLE_RATE

    def insert_audio(self, audio: np.ndarray) -> None:
        self.audio = np.concatenate([self.audio, np.asarray(audio, dtype=np.float32)])

    def prompt(self) -> str:
        """The committed text before the buffer (Whisper's prompt), its last ``PROMPT_CHARS`` characters."""
        before = [w for w in self.committed if w.end <= self.buffer_offset]
        text = "".join(w.text for w in before).strip()
        return text[-PROMPT_CHARS:]

    def process_iter(self) -> Step:
        """Decode the buffer once; return the newly committed words and the pending hypothesis."""
        words = self.asr.transcribe(self.audio, prompt=self.prompt(), language=self.language)
        self.hypothesis.insert(words, self.buffer_offset)
        committed = self.hypothesis.flush()
        self.committed.extend(committed)
        if self.buffer_end - self.buffer_offset > HARD_TRIM_S and self.committed:
            self.trim_at(self.committed[-1].end)
        return Step(committed, self.hypothesis.pending())

    def trim_at(self, time: float) -> None:
        """Drop the buffer's audio before ``time`` (an utterance closed there)."""
        if time <= self.buffer_offset:
            return
        cut = int(round((time - self.buffer_offset) * SAMPLE_RATE))
        self.audio = self.audio[cut:]
        self.buffer_offset = time
        self.hypothesis.pop_committed(time)

    def finish(self) -> list[TimedWord]:
        """At the end of the stream: the last hypothesis, committed as it is."""
        rest = self.hypothesis.pending()
        self.committed.extend(rest)
        self.hypothesis.buffer = []
        return rest
