"""One live stream: audio chunks in, ``Partial``/``Final``/``SpeakerUpdate`` out.

``LiveSession.feed`` takes each chunk as it arrives and decodes once at least ``min_chunk_s`` of
new audio has come (a slower machine decodes less often, on more audio: it falls behind no more
than one decoding). Committed words (``agreement``) are grouped into utterances, closed at the
end of a sentence, at a pause, or past ``max_utterance_s``; each closed utterance is a ``Final``,
labelled with a speaker (``speakers``). ``stop`` decodes what is left and closes everything.

A stream that names no language is identified once, from its first ``language_probe_s`` of
audio (longer while Whisper is unsure), by the multilingual model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.audio import SAMPLE_RATE
from pipeline.streaming.agreement import OnlineTranscriber, Step
from pipeline.streaming.asr import StreamModels
from pipeline.streaming.speakers import (
    LocalTurn,
    OnlineSpeakers,
    is_reliable,
    local_turns,
    speaker_label,
    utterance_audio,
)
from pipeline.streaming.types import Event, Final, Partial, SpeakerUpdate, TimedWord, join_words

SENTENCE_ENDS = (".", "?", "!", "。", "？", "！")
LANGUAGE_SURE_P = 0.5  # below this the identification waits for more audio, up to LANGUAGE_MAX_WAIT_S
LANGUAGE_MAX_WAIT_S = 8.0
RECENT_S = 40.0  # audio kept for the speaker embeddings (an utterance is at most max_utterance_s)


@dataclass
class LiveOptions:
    language: str | None = None  # None: identified from the first seconds
    num_speakers: int | None = None
    max_speakers: int | None = None
    min_chunk_s: float = 0.5  # decode after at least this much new audio
    trim_s: float = 10.0  # once the buffer is longer, it is cut at the last closed utterance
    pause_close_s: float = 0.8  # silence after the last committed word, nothing pending: the utterance ends
    pause_split_s: float = 1.0  # a gap this long between committed words starts a new utterance
    max_utterance_s: float = 15.0
    language_probe_s: float = 2.0


class LiveSession:
    """A stream's state. Not thread-safe: one caller feeds it."""

    def __init__(self, models: StreamModels, options: LiveOptions | None = None) -> None:
        self.models = models
        self.options = options or LiveOptions()
        self.language: str | None = self.options.language
        self.language_probability: float | None = None
        self.transcriber: OnlineTranscriber | None = None
        self.received = 0  # samples
        self.decoded_at = 0  # samples received when the last decoding started
        self.recent = np.zeros(0, dtype=np.float32)
        self.recent_offset = 0.0
        self.utterance: list[TimedWord] = []
        self.finals: list[Final] = []
        self.last_partial = ""
        limit = self.options.num_speakers or self.options.max_speakers
        self.speakers = OnlineSpeakers(max_speakers=limit)
        self.final_speaker: dict[int, int] = {}
        if self.language is None and not models.identifies_language:
            self.language = "en"  # an English-only deployment: every stream is English
        if self.language is not None:
            self.transcriber = OnlineTranscriber(models.for_language(self.language), self.language)

    @property
    def received_s(self) -> float:
        return self.received / SAMPLE_RATE

    def feed(self, chunk: np.ndarray) -> list[Event]:
        """Take a chunk (16 kHz mono float32); decode when enough new audio has come."""
        chunk = np.asarray(chunk, dtype=np.float32)
        self._remember(chunk)
        self.received += len(chunk)
        if self.transcriber is None:
            if not self._identify(final=False):
                return []
        else:
            self.transcriber.insert_audio(chunk)
        if (self.received - self.decoded_at) / SAMPLE_RATE < self.options.min_chunk_s:
            return []
        return self._decode()

    def stop(self) -> list[Event]:
        """The end of the stream: decode what is left, commit the last hypothesis, close every utterance."""
        return self.flush()

    def flush(self) -> list[Event]:
        """Everything heard so far made final now (the end of the stream, or a client's commit at the
        end of its turn): decode what is left, commit the last hypothesis as it is, close the open
        utterance. The stream may go on: the next audio starts a new buffer."""
        if self.transcriber is None:
            self._identify(final=True)
        events: list[Event] = []
        if self.transcriber is None:
            return events
        if self.received > self.decoded_at:
            events += self._decode()
        for word in self.transcriber.finish():
            events += self._add_word(word)
        events += self._close()
        self.transcriber.trim_at(self.transcriber.buffer_end)  # all of it is final: none is decoded again
        return events

    # --- steps ------------------------------------------------------------------------------

    def _identify(self, *, final: bool) -> bool:
        """Identify the stream's language once enough audio has come; True when known."""
        heard = self.received_s
        if heard < self.options.language_probe_s and not final:
            return False
        assert self.models.multilingual is not None  # noqa: S101  # set in __init__ otherwise
        audio = self.recent[-int(30 * SAMPLE_RATE) :]
        if heard == 0:
            language, p = "en", 0.0
        else:
            language, p = self.models.multilingual.detect_language(audio)
        if p < LANGUAGE_SURE_P and heard < LANGUAGE_MAX_WAIT_S and not final:
            return False
        self.language, self.language_probability = language, p
        self.transcriber = OnlineTranscriber(self.models.for_language(language), language)
        self.transcriber.insert_audio(self.recent[-self.received :] if self.received else self.recent[:0])
        return True

    def _decode(self) -> list[Event]:
        assert self.transcriber is not None  # noqa: S101
        self.decoded_at = self.received
        step = self.transcriber.process_iter()
        return self._on_step(step)

    def _on_step(self, step: Step) -> list[Event]:
        assert self.transcriber is not None  # noqa: S101
        events: list[Event] = []
        for word in step.committed:
            events += self._add_word(word)
        silent = self.transcriber.buffer_end - (self.utterance[-1].end if self.utterance else 0.0)
        if self.utterance and not step.pending and silent >= self.options.pause_close_s:
            events += self._close()
        shown = self.utterance + step.pending
        text = join_words(shown)
        if text and text != self.last_partial:
            events.append(Partial(text, shown[0].start, shown[-1].end))
        self.last_partial = text
        closed_end = self.finals[-1].end if self.finals else 0.0
        buffered = self.transcriber.buffer_end - self.transcriber.buffer_offset
        if buffered > self.options.trim_s and closed_end > self.transcriber.buffer_offset:
            self.transcriber.trim_at(closed_end)
        return events

    def _add_word(self, word: TimedWord) -> list[Event]:
        events: list[Event] = []
        if self.utterance and word.start - self.utterance[-1].end >= self.options.pause_split_s:
            events += self._close()
        self.utterance.append(word)
        long = word.end - self.utterance[0].start >= self.options.max_utterance_s
        if word.text.strip().endswith(SENTENCE_ENDS) or long:
            events += self._close()
        return events

    def _close(self) -> list[Event]:
        """The open utterance as finals with their speakers (one per speaker turn in it), and any
        earlier finals a merge relabelled."""
        if not self.utterance:
            return []
        words, self.utterance = self.utterance, []
        if not join_words(words):
            return []
        events: list[Event] = []
        for turn in self._turns(words):
            final = Final(
                len(self.finals),
                turn.words[0].start,
                turn.words[-1].end,
                join_words(turn.words),
                self.language or "",
                turn.words,
            )
            self.finals.append(final)
            events.append(final)
            if self.models.embed is not None:
                events += self._label(final, turn)
        return events

    def _turns(self, words: list[TimedWord]) -> list[LocalTurn]:
        """The utterance cut at speaker changes (with segmentation-3.0), each turn's voice embedded."""
        embed, segment = self.models.embed, self.models.segment
        if embed is not None and segment is not None:
            return local_turns(words, self.recent, self.recent_offset, segment, embed)
        clip = utterance_audio(self.recent, words[0].start, words[-1].end, self.recent_offset)
        if embed is None or clip is None:
            return [LocalTurn(words, None, False)]
        return [LocalTurn(words, embed(clip, None), is_reliable(clip))]

    def _label(self, final: Final, turn: LocalTurn) -> list[Event]:
        """The final's speaker, and a ``SpeakerUpdate`` for each earlier final a merge relabelled."""
        previous = self.final_speaker.get(final.id - 1)
        who, moved = self.speakers.assign(final.id, turn.embedding, previous, reliable=turn.reliable)
        self.final_speaker[final.id] = who
        final.speaker = speaker_label(who)
        events: list[Event] = []
        for fid in moved:
            now = self.speakers.resolve(self.final_speaker[fid])
            if now != self.final_speaker[fid] or self.finals[fid].speaker != speaker_label(now):
                self.final_speaker[fid] = now
                self.finals[fid].speaker = speaker_label(now)
                if fid != final.id:
                    events.append(SpeakerUpdate(fid, speaker_label(now)))
        return events

    def _remember(self, chunk: np.ndarray) -> None:
        self.recent = np.concatenate([self.recent, chunk])
        keep = int(RECENT_S * SAMPLE_RATE)
        if len(self.recent) > keep and self.transcriber is not None:
            drop = len(self.recent) - keep
            self.recent = self.recent[drop:]
            self.recent_offset += drop / SAMPLE_RATE

    def live_result(self) -> dict[str, object]:
        """The finals as they stand (speakers after every merge): ``result.live`` of the stream's job."""
        return {
            "language": self.language,
            "language_probability": self.language_probability,
            "speakers": sorted({f.speaker for f in self.finals if f.speaker}),
            "finals": [{k: v for k, v in f.to_message().items() if k != "type"} for f in self.finals],
        }
