"""Word timestamps.

Two methods, and the result says which one ran:
- ``wav2vec2``: ``whisperx.align`` with a wav2vec2 CTC model named in settings
  (when it is configured and present locally);
- ``whisper``: Whisper's own cross-attention alignment, the mechanism behind
  faster-whisper's ``word_timestamps=True``, applied to the text the transcribe
  stage decoded. The transcribe stage does it on the encoder output it already
  has (``Transcript`` segments then carry their words) and this stage only reads
  them; for a transcript without words it encodes each chunk again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audio import load_wav
from pipeline.errors import ProcessingError
from pipeline.speech_types import AlignedSegment, Alignment, Transcript, Word

PREPEND_PUNCT = "\"'“¿([{-"
APPEND_PUNCT = "\"'.。,，!！?？:：”)]}、"


def align_with_whisper(
    asr_model: Any,
    wav_path: Path,
    transcript: Transcript,
    *,
    batch_size: int = 8,
    hook: Callable[[float], None] | None = None,
) -> Alignment:
    """Word times from Whisper's cross-attention (DTW over alignment heads), batched per chunk.

    Segments that already carry words (timed by the transcribe stage) are taken as they are.
    """
    if all(s.words is not None for s in transcript.segments):
        if hook:
            hook(1.0)
        return Alignment(
            segments=[
                AlignedSegment(s.start, s.end, s.text, [Word(**w) for w in s.words or []], s.language)
                for s in transcript.segments
            ],
            method="whisper",
        )
    from faster_whisper.tokenizer import Tokenizer
    from whisperx.audio import N_SAMPLES, log_mel_spectrogram

    whisper = asr_model.model  # faster_whisper.WhisperModel
    tokenizers: dict[str, Any] = {}

    def tokenizer_for(language: str) -> Any:
        if language not in tokenizers:
            tokenizers[language] = Tokenizer(
                whisper.hf_tokenizer, whisper.model.is_multilingual, task="transcribe", language=language
            )
        return tokenizers[language]

    n_mels = whisper.feat_kwargs.get("feature_size") or 80

    out: list[AlignedSegment] = []
    segs = transcript.segments
    # batches of consecutive segments in one language: one prompt (language token) per call
    batches: list[list[Any]] = []
    for seg in segs:
        if batches and len(batches[-1]) < batch_size and batches[-1][0].language == seg.language:
            batches[-1].append(seg)
        else:
            batches.append([seg])
    done = 0
    for batch in batches:
        feats, tokens, frames = [], [], []
        tokenizer = tokenizer_for(batch[0].language or transcript.language)
        for s in batch:
            audio = load_wav(wav_path, s.start, s.end)[:N_SAMPLES]
            mel = log_mel_spectrogram(audio, n_mels=n_mels, padding=N_SAMPLES - audio.shape[0])
            feats.append(np.asarray(mel, dtype=np.float32)[:, : N_SAMPLES // 160])
            tokens.append([t for t in tokenizer.encode(" " + s.text.strip()) if t < tokenizer.eot])
            frames.append(max(1, min(3000, int(round(len(audio) / 160)))))
        encoder_output = whisper.encode(np.stack(feats))
        try:
            results = whisper.model.align(encoder_output, tokenizer.sot_sequence, tokens, frames, median_filter_width=7)
        except Exception as e:
            raise ProcessingError(f"word alignment failed: {e}") from e
        for s, res, toks in zip(batch, results, tokens, strict=True):
            words = words_from_alignment(res, toks, tokenizer, whisper, s.end - s.start)
            for w in words:
                w.start, w.end = round(s.start + w.start, 3), round(s.start + w.end, 3)
            out.append(AlignedSegment(s.start, s.end, s.text, words, s.language))
        if hook:
            done += len(batch)
            hook(min(1.0, done / max(1, len(segs))))
    return Alignment(segments=out, method="whisper")


def words_from_alignment(
    result: Any, text_tokens: list[int], tokenizer: Any, whisper: Any, duration: float
) -> list[Word]:
    """Words with times relative to their chunk (0 .. ``duration``) from ctranslate2's
    ``Whisper.align`` result for ``text_tokens``; faster-whisper's word grouping and
    punctuation merging."""
    from faster_whisper.transcribe import merge_punctuations

    if not text_tokens:
        return []
    text_indices = np.array([p[0] for p in result.alignments])
    time_indices = np.array([p[1] for p in result.alignments])
    words, word_tokens = tokenizer.split_to_word_tokens(text_tokens + [tokenizer.eot])
    if len(word_tokens) <= 1 or len(text_indices) == 0:
        return []
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / whisper.tokens_per_second
    if len(jump_times) < boundaries[-1] + 1:
        jump_times = np.pad(jump_times, (0, boundaries[-1] + 1 - len(jump_times)), mode="edge")
    starts = jump_times[boundaries[:-1]]
    ends = jump_times[boundaries[1:]]
    probs = result.text_token_probs
    alignment = [
        {
            "word": w,
            "tokens": t,
            "start": float(a),
            "end": float(b),
            "probability": float(np.mean(probs[i:j])) if j > i else 0.0,
        }
        for w, t, a, b, i, j in zip(words, word_tokens, starts, ends, boundaries[:-1], boundaries[1:], strict=False)
    ]
    max_duration = _clamp_long_words(alignment)
    merge_punctuations(alignment, PREPEND_PUNCT, APPEND_PUNCT)
    alignment = [a for a in alignment if a["word"].strip()]
    _clamp_first_word(alignment, max_duration)
    result_words: list[Word] = []
    for a in alignment:
        start = min(max(0.0, a["start"]), duration)
        end = min(max(a["end"], a["start"]), duration)
        result_words.append(
            Word(word=a["word"].strip(), start=round(start, 3), end=round(end, 3), score=round(a["probability"], 3))
        )
    return result_words


# Whisper's own limits on a word's length (openai/whisper timing.py, faster-whisper's
# add_word_timestamps): the cross-attention puts a word's start at the end of the silence or
# noise before it, so a chunk that begins with noise gets a first word seconds long
MEDIAN_WORD_CAP_S = 0.7
SENTENCE_END_MARKS = ".。!！?？"


def _clamp_long_words(alignment: list[dict[str, Any]]) -> float:
    """Whisper's sentence-boundary rule: a word longer than twice the median that is, or
    follows, a sentence end is cut to that length. Returns that length."""
    durations = np.array([a["end"] - a["start"] for a in alignment])
    durations = durations[durations.nonzero()]
    median = min(MEDIAN_WORD_CAP_S, float(np.median(durations))) if len(durations) else 0.0
    max_duration = median * 2
    if len(durations):
        for prev, word in zip(alignment, alignment[1:], strict=False):
            if word["end"] - word["start"] > max_duration:
                if word["word"] in SENTENCE_END_MARKS:
                    word["end"] = word["start"] + max_duration
                elif prev["word"] in SENTENCE_END_MARKS:
                    word["start"] = word["end"] - max_duration
    return max_duration


def _clamp_first_word(words: list[dict[str, Any]], max_duration: float) -> None:
    """Whisper's rule for the first words after a pause (here: the chunk's start): neither
    may be longer than ``max_duration``; the first starts at most that long before it ends."""
    if not words or max_duration <= 0:
        return
    first = words[0]
    if first["end"] > max_duration * 2 and (
        first["end"] - first["start"] > max_duration
        or (len(words) > 1 and words[1]["end"] - first["start"] > max_duration * 2)
    ):
        if len(words) > 1 and words[1]["end"] - words[1]["start"] > max_duration:
            boundary = max(words[1]["end"] / 2, words[1]["end"] - max_duration)
            first["end"] = words[1]["start"] = boundary
        first["start"] = max(0.0, first["end"] - max_duration)


def load_wav2vec2_aligner(name_or_path: str, language: str, device: str) -> tuple[Any, dict[str, Any]]:
    """whisperx's wav2vec2 aligner from a local directory or the local Hugging Face cache."""
    import whisperx

    try:
        return whisperx.load_align_model(language, device, model_name=name_or_path, model_cache_only=True)
    except Exception as e:
        raise ProcessingError(f"alignment model {name_or_path!r} is not available locally: {e}") from e


def align_with_wav2vec2(
    aligner: tuple[Any, dict[str, Any]], wav_path: Path, transcript: Transcript, *, device: str, name: str
) -> Alignment:
    import whisperx

    model, metadata = aligner
    audio = load_wav(wav_path)
    segments = [{"start": s.start, "end": s.end, "text": s.text} for s in transcript.segments]
    result = whisperx.align(segments, model, metadata, audio, device, return_char_alignments=False)
    out: list[AlignedSegment] = []
    for s in result["segments"]:
        words = [
            Word(word=w["word"], start=float(w["start"]), end=float(w["end"]), score=w.get("score"))
            for w in s.get("words", [])
            if "start" in w and "end" in w
        ]
        out.append(AlignedSegment(float(s["start"]), float(s["end"]), s["text"].strip(), words, transcript.language))
    return Alignment(segments=out, method="wav2vec2", model=name)


def align_by_language(
    transcript: Transcript,
    aligner_for: Callable[[str], tuple[Any, str] | None],
    whisper_words: Callable[[Transcript], Alignment],
    wav2vec2_words: Callable[[Transcript, tuple[Any, str]], Alignment],
) -> Alignment:
    """Word times for each language of ``transcript`` by its own method: the wav2vec2 aligner
    ``aligner_for(language)`` gives, else Whisper's (``whisper_words``). The result's method
    names every method that ran, in order of first use ('whisper', 'wav2vec2' or both joined by '+')."""
    by_language: dict[str, list[Any]] = {}
    for seg in transcript.segments:
        by_language.setdefault(seg.language or transcript.language, []).append(seg)
    if not by_language:
        by_language[transcript.language] = []
    parts: list[Alignment] = []
    for language, segs in by_language.items():
        part = Transcript(segments=segs, language=language)
        aligner = aligner_for(language)
        parts.append(whisper_words(part) if aligner is None else wav2vec2_words(part, aligner))
    methods = list(dict.fromkeys(p.method for p in parts))
    models = list(dict.fromkeys(p.model for p in parts if p.model))
    segments = sorted((s for p in parts for s in p.segments), key=lambda s: (s.start, s.end))
    return Alignment(segments=segments, method="+".join(methods), model=", ".join(models) or None)
