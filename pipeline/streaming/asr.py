"""The Whisper backend of live transcription: faster-whisper on the embedded models.

whisper_streaming's ``FasterWhisperASR``: the buffer is decoded whole each time (greedy, word
times from cross-attention), prompted with the committed text before it. Segments Whisper
itself marks as silence are dropped (its no-speech test), as are words it puts past the audio.
The English-only tiny.en decodes English, the multilingual Whisper base every other language
and identifies the language of a stream that names none (``StreamModels``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audio import SAMPLE_RATE
from pipeline.errors import UnsupportedOptionError
from pipeline.loop_guard import loop_reason
from pipeline.streaming.types import TimedWord

# Whisper's own no-speech test (openai/whisper transcribe.py), per segment
NO_SPEECH_P = 0.6
NO_SPEECH_LOGPROB = -1.0
# A decoding may write at most this many tokens per second of audio (plus a few): speech needs far
# fewer (Korean, the densest here, about 10), and a decoder caught in a loop on a short buffer
# otherwise writes Whisper's 448 tokens, seconds of compute (seen: 9-18 s on 2-4 s of Korean)
MAX_TOKENS_PER_S = 20
MIN_TOKENS = 16
# Whisper's context is 448 tokens and faster-whisper refuses a decoding whose prompt plus
# max_new_tokens exceeds it; its prompt (the initial prompt and the text before) takes at most
# 448 // 2 - 1 tokens plus the start-of-transcript sequence. A buffer that grew past ~11 s while
# decoding lagged (a loaded machine) asked for more and failed the stream with a ValueError.
MAX_NEW_TOKENS = 448 // 2 - 8


class WhisperBackend:
    """One faster-whisper model, decoding a buffer into words (``agreement.Asr``)."""

    def __init__(self, model: Any, *, beam_size: int = 1) -> None:
        self.model = model
        self.beam_size = beam_size

    @property
    def multilingual(self) -> bool:
        return bool(self.model.model.is_multilingual)

    def transcribe(self, audio: np.ndarray, *, prompt: str, language: str) -> list[TimedWord]:
        segments, _ = self.model.transcribe(
            audio,
            language=language if self.multilingual else None,
            initial_prompt=prompt or None,
            beam_size=self.beam_size,
            word_timestamps=True,
            condition_on_previous_text=True,
            vad_filter=False,
            temperature=0.0,
            max_new_tokens=min(MAX_NEW_TOKENS, int(MIN_TOKENS + MAX_TOKENS_PER_S * len(audio) / SAMPLE_RATE)),
        )
        length = len(audio) / SAMPLE_RATE
        words: list[TimedWord] = []
        for seg in segments:
            if seg.no_speech_prob > NO_SPEECH_P and seg.avg_logprob < NO_SPEECH_LOGPROB:
                continue
            if loop_reason(seg.text):  # a loop is not speech, however often two decodings agree on it
                continue
            for w in seg.words or []:
                # a word of punctuation alone is what Whisper writes into silence
                if w.start < length and any(c.isalnum() for c in w.word):
                    words.append(TimedWord(round(w.start, 3), round(min(w.end, length), 3), w.word, w.probability))
        return words

    def detect_language(self, audio: np.ndarray) -> tuple[str, float]:
        """(language, probability) from the first 30 s of ``audio``."""
        language, probability, _ = self.model.detect_language(audio)
        return str(language), float(probability)


@dataclass
class StreamModels:
    """The models a stream worker preloads: ``english`` decodes English (the fast path),
    ``multilingual`` every other language and identifies an unnamed one. Either may be None."""

    english: WhisperBackend | None
    multilingual: WhisperBackend | None
    embed: Any = None  # speakers.Embedder, or None: no speaker labels
    segment: Any = None  # speakers.Segmenter: speaker changes inside an utterance; None: one speaker each

    def for_language(self, language: str) -> WhisperBackend:
        if language == "en" and self.english is not None:
            return self.english
        if self.multilingual is None:
            raise UnsupportedOptionError(
                f"language {language!r} needs a multilingual ASR model; this stream worker has none "
                "(set ECG_ASR_MULTILINGUAL_MODEL)"
            )
        return self.multilingual

    @property
    def identifies_language(self) -> bool:
        return self.multilingual is not None


def load_whisper(path: str | Path, *, compute_type: str, threads: int, device: str = "cpu") -> WhisperBackend:
    """A faster-whisper model from a local CTranslate2 folder (``pipeline.asr_models.resolve_asr_model``)."""
    from faster_whisper import WhisperModel

    model = WhisperModel(
        str(path), device=device, compute_type=compute_type, cpu_threads=threads, local_files_only=True
    )
    return WhisperBackend(model)
