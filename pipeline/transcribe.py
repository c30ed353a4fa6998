"""Speech to text: Whisper's 30 s chunks of speech, then batched faster-whisper.

The speech is the diarization's turns when they are given (the stage after diarize always
gives them: speech is found once per file), else WhisperX's bundled pyannote VAD.
Long recordings are transcribed window by window (cut at the quietest moment
near each window's end), so memory stays bounded by the window, not the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.align import words_from_alignment
from pipeline.asr_models import resolve_asr_model
from pipeline.audio import SAMPLE_RATE, load_wav, quiet_cut, wav_duration
from pipeline.coverage import Gap, uncovered
from pipeline.errors import ProcessingError, UnsupportedOptionError
from pipeline.language_id import (
    CHUNK_LANGUAGE_MIN_P,
    CHUNK_LANGUAGE_MIN_S,
    Guess,
    chunk_languages,
    identify,
    speaker_runs,
)
from pipeline.loop_guard import loop_reason
from pipeline.parallel_decode import decode_streams, even_batches, model_streams, parallel_map
from pipeline.speech_chunks import CUT_SEARCH_S, speech_chunks
from pipeline.speech_types import AsrSegment, Transcript

__all__ = ["AsrRoute", "AsrSegment", "DecodeOptions", "Transcript", "load_asr_model", "transcribe"]

WINDOW_S = 600.0  # transcribe at most this much audio at once
# WhisperX's VAD slides its 5 s window by 10 % (0.5 s), so every second of audio goes through the
# LSTM ten times; half a window is enough for the speech/non-speech scores it needs (the same chunks
# and speech, in a fifth of the time: the commit that chose it has the figures).
VAD_STEP_RATIO = 0.5
# The second pass decodes each stretch of speech left without words with this much audio either
# side (less than coverage.WORD_PAD_S, so no word the first pass timed is decoded twice), in
# pieces of at most 30 s (Whisper's window).
SECOND_PASS_MARGIN_S = 0.3
SECOND_PASS_MAX_S = 30.0
# Whisper's own test for a window without speech (openai/whisper transcribe.py), applied in the
# second pass: a stretch the first pass left empty is where a decoder invents words
NO_SPEECH_P = 0.6
NO_SPEECH_LOGPROB = -1.0


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
    parallel = decode_streams(device, threads)
    try:
        import torch
        from whisperx.asr import WhisperModel

        torch_threads = torch.get_num_threads()
        whisper = WhisperModel(
            source,
            device=device,
            compute_type=compute_type,
            cpu_threads=threads // parallel,
            num_workers=parallel,
            local_files_only=not is_local,
        )
        # CTranslate2 sets the OpenMP threads of the thread that loads a model to its
        # cpu_threads, i.e. torch's (and so the diarization's ONNX Runtime sessions, made
        # later with torch's count): one thread each, where the process may use them all
        torch.set_num_threads(torch_threads)
        model = whisperx.load_model(
            source,
            device=device,
            compute_type=compute_type,
            vad_method="pyannote",
            asr_options={"beam_size": beam_size, "best_of": beam_size},
            model=whisper,
            local_files_only=not is_local,
        )
        _tame_whisperx_logger()  # whisperx (re)installs its stdout handler while loading
        _set_vad_step(model, VAD_STEP_RATIO)
        model.ecg_cpu_threads = threads  # CTranslate2 does not report its intra-op threads: ops read it here
        model.ecg_parallel = parallel
        if is_multilingual(model):
            # decode with timestamp tokens, as Whisper itself does (the text keeps only the text
            # tokens): Whisper base transcribes Korean more accurately so (bench/quality.py's CER)
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


@dataclass
class DecodeOptions:
    """What a job adds to every decoding: ``prompt`` (faster-whisper's initial_prompt: the
    text before the audio, e.g. names spelt right) and ``hotwords`` (terms to favour)."""

    prompt: str | None = None
    hotwords: str | None = None
    word_timestamps: bool = True
    skip_silence: bool = False  # Whisper's no-speech test: no text where it hears no speech


@dataclass
class _Decoding:
    """What the windows and the second pass add up to."""

    segments: list[AsrSegment] = field(default_factory=list)
    regions: list[tuple[float, float]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    confidence: dict[str, float] = field(default_factory=dict)  # language -> seconds x probability
    repaired: int = 0
    reasons: list[Gap] = field(default_factory=list)  # why a stretch of speech has no words
    second_pass: dict[str, float] = field(default_factory=lambda: {"stretches": 0, "seconds": 0.0, "filled": 0})
    language_id_s: float = 0.0

    def count(self, lang: str, p: float, seconds: float) -> None:
        self.seconds[lang] = self.seconds.get(lang, 0.0) + seconds
        self.confidence[lang] = self.confidence.get(lang, 0.0) + seconds * p


def transcribe(
    models: AsrRoute | Any,
    wav_path: Path,
    *,
    batch_size: int = 8,
    language: str | None = None,
    hook: Callable[[str, float], None] | None = None,
    window_s: float = WINDOW_S,
    word_timestamps: bool = True,
    speech_turns: Sequence[tuple[float, float, str]] | None = None,
    prompt: str | None = None,
    hotwords: str | None = None,
    second_pass: bool = True,
) -> Transcript:
    """Transcribe a 16 kHz mono WAV. ``hook(step, fraction)`` gets 'vad' and 'asr' progress.

    The speech to decode is ``speech_turns`` (the diarization's (start, end, speaker)) joined
    into chunks of up to 30 s (``speech_chunks``); without turns, WhisperX's VAD finds it.

    ``models``: an ``AsrRoute`` or one loaded model. With no ``language`` the language is
    identified on every speech chunk (a window's language is the one with most confident
    speech; a chunk keeps its own when Whisper is sure of it), and a chunk whose first and
    last speaker runs (``speech_turns``: the diarization's (start, end, speaker)) differ in
    language is cut where it changes (``pipeline.language_id``); each segment says which
    language it was decoded as. An English-only ``main`` model can only mean English.

    Then, with ``second_pass``, every stretch of speech (the turns, else the VAD's regions)
    that the first pass left without words is decoded again on its own, its language
    identified anew; what still has no words is in ``Transcript.gaps`` with the reason.

    With ``word_timestamps`` each segment also gets its words' times from Whisper's
    cross-attention, computed on the encoder output the decoding already produced (the
    align stage then has nothing left to compute unless a wav2vec2 aligner is configured).
    """
    route = models if isinstance(models, AsrRoute) else AsrRoute(main=models)
    detect = language is None and is_multilingual(route.main)
    if language is None and not detect:
        language = "en"
    opts = DecodeOptions(prompt=prompt or None, hotwords=hotwords or None, word_timestamps=word_timestamps)
    turns = sorted((float(a), float(b), str(s)) for a, b, s in (speech_turns or []))
    total = wav_duration(wav_path)
    acc = _Decoding()
    start = 0.0
    while start < total - 0.01:
        end = quiet_cut(wav_path, start, min(total, start + window_s), total, CUT_SEARCH_S)
        _transcribe_window(route, wav_path, (start, end), total, acc, detect, language, batch_size, turns, opts, hook)
        start = end
    if second_pass:
        speech = [(a, b) for a, b, _ in turns] if turns else acc.regions
        _second_pass(route, wav_path, speech, total, acc, detect, language, batch_size, opts)
    acc.segments.sort(key=lambda s: (s.start, s.end))
    seconds, confidence = acc.seconds, acc.confidence
    if language is not None:
        main_language, probability = language, None
    elif seconds:
        main_language = max(seconds, key=lambda k: seconds[k])
        probability = round(confidence[main_language] / seconds[main_language], 3)
    else:  # no speech at all: nothing was identified
        main_language, probability = "en", None
    return Transcript(
        segments=acc.segments,
        language=main_language,
        speech_regions=acc.regions,
        repaired_chunks=acc.repaired,
        language_probability=probability,
        languages={k: round(v, 3) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])},
        gaps=[g.to_dict() for g in sorted(acc.reasons, key=lambda g: g.start)],
        second_pass={k: round(v, 3) for k, v in acc.second_pass.items()},
        language_id_s=round(acc.language_id_s, 3),
    )


def _transcribe_window(
    route: AsrRoute,
    wav_path: Path,
    window: tuple[float, float],
    total: float,
    acc: _Decoding,
    detect: bool,
    language: str | None,
    batch_size: int,
    turns: Sequence[tuple[float, float, str]],
    opts: DecodeOptions,
    hook: Callable[[str, float], None] | None,
) -> None:
    """One window: VAD, the chunks' languages (cut where they change), decoding."""
    from whisperx.vads import Pyannote

    start, end = window
    audio = load_wav(wav_path, start, end)
    if turns:
        spans = speech_chunks(turns, start, end, wav_path, total)
    else:
        vad_params = route.main._vad_params
        waveform = Pyannote.preprocess_audio(audio)
        vad = route.main.vad_model({"waveform": waveform, "sample_rate": SAMPLE_RATE})
        chunks = Pyannote.merge_chunks(vad, 30, onset=vad_params["vad_onset"], offset=vad_params["vad_offset"])
        spans = [(float(c["start"]), float(c["end"])) for c in chunks]
    if hook and not acc.regions:
        hook("vad", 1.0)
    acc.regions += [(round(start + a, 3), round(start + b, 3)) for a, b in spans]
    if detect:
        runs = speaker_runs(turns, start, end)
        t0 = time.perf_counter()
        spans, langs = chunk_languages(route.main, audio, spans, runs, batch_size)
        acc.language_id_s += time.perf_counter() - t0
    else:
        langs = [(str(language), 1.0)] * len(spans)
    pieces = [audio[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)] for a, b in spans]
    for (lang, p), piece in zip(langs, pieces, strict=True):
        acc.count(lang, p, len(piece) / SAMPLE_RATE)

    def progress(decoded: int) -> None:
        if hook:
            hook("asr", min(1.0, (start + (end - start) * decoded / max(1, len(pieces))) / total))

    absolute = [(round(start + a, 3), round(start + b, 3)) for a, b in spans]
    _decode_pieces(route, pieces, absolute, [lang for lang, _ in langs], batch_size, opts, acc, progress)
    if hook:
        hook("asr", min(1.0, end / total))


def _decode_pieces(
    route: AsrRoute,
    pieces: list[np.ndarray],
    spans: list[tuple[float, float]],
    langs: list[str],
    batch_size: int,
    opts: DecodeOptions,
    acc: _Decoding,
    progress: Callable[[int], None] | None = None,
) -> list[bool]:
    """Decode pieces (each <= 30 s) in batches of consecutive pieces in one language (one prompt
    per batch), as many batches at once as the models decode (``decode_streams``); their
    segments go to ``acc``. Returns, per piece, whether it gave any text."""
    streams = model_streams(route.main, route.english)
    runs: list[list[int]] = []
    for i, lang in enumerate(langs):
        if runs and langs[runs[-1][0]] == lang:
            runs[-1].append(i)
        else:
            runs.append([i])
    batches = [[run[k] for k in part] for run in runs for part in even_batches(len(run), batch_size, streams)]

    def decode(idx: list[int]) -> list[_Decoded]:
        lang = langs[idx[0]]
        model, _ = route.for_language(lang)
        return _transcribe_batch(model, [pieces[i] for i in idx], _tokenizer(model, lang), lang, opts)

    got = [False] * len(pieces)
    decoded = 0
    for idx, results in zip(batches, parallel_map(streams, decode, batches), strict=True):
        lang = langs[idx[0]]
        for i, res in zip(idx, results, strict=True):
            a, b = spans[i]
            acc.repaired += res.repaired
            if res.dropped:
                acc.reasons.append(Gap(a, b, res.dropped))
            if res.text:
                got[i] = True
                seg = AsrSegment(start=a, end=b, text=res.text, avg_logprob=res.logprob, language=lang)
                if res.words is not None:
                    seg.words = [_word_dict(w, seg.start, seg.end) for w in res.words]
                acc.segments.append(seg)
        decoded += len(idx)
        if progress:
            progress(decoded)
    return got


def _word_spans(segments: Sequence[AsrSegment]) -> list[list[tuple[float, float]]]:
    """Per segment its words' times (the whole segment when it has no word times)."""
    return [[(w["start"], w["end"]) for w in s.words] if s.words is not None else [(s.start, s.end)] for s in segments]


def _second_pass(
    route: AsrRoute,
    wav_path: Path,
    speech: Sequence[tuple[float, float]],
    total: float,
    acc: _Decoding,
    detect: bool,
    language: str | None,
    batch_size: int,
    opts: DecodeOptions,
) -> None:
    """Decode again, each on its own and in its own language, the stretches of speech that the
    first pass left without words (a language change it missed, a chunk Whisper gave up on)."""
    stretches = uncovered(speech, _word_spans(acc.segments))
    if not stretches:
        return
    spans: list[tuple[float, float]] = []
    for a, b in stretches:
        a, b = max(0.0, a - SECOND_PASS_MARGIN_S), min(total, b + SECOND_PASS_MARGIN_S)
        n = math.ceil((b - a) / SECOND_PASS_MAX_S)
        spans += [(a + (b - a) * k / n, a + (b - a) * (k + 1) / n) for k in range(n)]
    pieces = [load_wav(wav_path, a, b) for a, b in spans]
    if detect:
        t0 = time.perf_counter()
        guesses: list[Guess] = [(lang, p) for lang, p, _ in identify(route.main, pieces, batch_size)]
        acc.language_id_s += time.perf_counter() - t0
        for k, ((a, b), (lang, p)) in enumerate(zip(spans, guesses, strict=True)):
            if p < CHUNK_LANGUAGE_MIN_P or b - a < CHUNK_LANGUAGE_MIN_S:
                guesses[k] = (_nearest_language(acc.segments, a, b) or lang, p)
    else:
        guesses = [(str(language), 1.0)] * len(spans)
    langs = [lang for lang, _ in guesses]
    reasons = len(acc.reasons)
    got = _decode_pieces(route, pieces, spans, langs, batch_size, dataclasses.replace(opts, skip_silence=True), acc)
    explained = {(g.start, g.end) for g in acc.reasons[reasons:]}
    for (a, b), (lang, p), ok in zip(spans, guesses, got, strict=True):
        acc.count(lang, p, b - a)
        if not ok and (a, b) not in explained:
            acc.reasons.append(Gap(a, b, f"no words: decoded twice, the second time alone as '{lang}'"))
    acc.second_pass["stretches"] += len(spans)
    acc.second_pass["seconds"] += sum(b - a for a, b in spans)
    acc.second_pass["filled"] += sum(got)


def _nearest_language(segments: Sequence[AsrSegment], a: float, b: float) -> str | None:
    """The language of the decoded segment nearest to [a, b]."""
    best = min(segments, key=lambda s: max(0.0, s.start - b, a - s.end), default=None)
    return best.language if best is not None else None


@dataclass
class _Decoded:
    """One piece's decoding: text, mean log-probability, words relative to the piece (None
    without word times), whether it was re-decoded for a loop, and why it was dropped, if it was."""

    text: str
    logprob: float | None
    words: list[Any] | None
    repaired: bool
    dropped: str | None = None


def _transcribe_batch(
    model: Any, pieces: list[np.ndarray], tokenizer: Any, language: str, opts: DecodeOptions
) -> list[_Decoded]:
    """Decode up to ``batch_size`` chunks (each <= 30 s) in one encoder pass, as WhisperX's
    batched pipeline does (same features, prompt and decoding options), and, with
    ``opts.word_timestamps``, align the decoded text on that same encoder output.

    A chunk whose text loops (``pipeline.loop_guard``) is decoded again alone, barred from
    repeating itself (``_redecode``); when that loops too, its text is dropped and ``dropped`` says why.
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
    initial = opts.prompt or options.initial_prompt
    previous: list[int] = tokenizer.encode(" " + initial.strip()) if initial else []
    prompt = whisper.get_prompt(
        tokenizer,
        previous,
        without_timestamps=options.without_timestamps,
        prefix=options.prefix,
        hotwords=opts.hotwords or options.hotwords,
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
        return_no_speech_prob=opts.skip_silence,
    )
    out: list[_Decoded] = []
    tokens: list[list[int]] = []
    for piece, res in zip(pieces, results, strict=True):
        ids = res.sequences_ids[0]
        score = float(res.scores[0] * (len(ids) ** options.length_penalty) / (len(ids) + 1))
        logprob: float | None = score
        text_tokens = [t for t in ids if t < tokenizer.eot]
        text = str(tokenizer.tokenizer.decode(text_tokens)).strip()
        decoded = _Decoded(text, logprob, None, False)
        looped = loop_reason(text)
        if opts.skip_silence and res.no_speech_prob > NO_SPEECH_P and score < NO_SPEECH_LOGPROB:
            why = f"no words: Whisper hears no speech here (no-speech probability {res.no_speech_prob:.2f})"
            decoded, text_tokens = _Decoded("", None, None, False, why), []
        elif looped:
            # batched decoding has no fallback: re-decode this chunk alone, barred from repeating
            decoded = _redecode(model, piece, language, opts, looped)
            text_tokens = [t for t in tokenizer.encode(" " + decoded.text) if t < tokenizer.eot] if decoded.text else []
        out.append(decoded)
        tokens.append(text_tokens)
    if opts.word_timestamps and any(tokens):
        frames = [max(1, min(N_SAMPLES // 160, int(round(len(p) / 160)))) for p in pieces]
        # a chunk with no text aligns one end-of-text token, and gets no words
        aligned = whisper.model.align(
            encoder_output,
            tokenizer.sot_sequence,
            [t or [tokenizer.eot] for t in tokens],
            frames,
            median_filter_width=7,
        )
        for res, toks, piece, decoded in zip(aligned, tokens, pieces, out, strict=True):
            decoded.words = (
                words_from_alignment(res, toks, tokenizer, whisper, len(piece) / SAMPLE_RATE) if toks else []
            )
    elif opts.word_timestamps:
        for decoded in out:
            decoded.words = []
    return out


def _word_dict(word: Any, start: float, end: float) -> dict[str, Any]:
    """A chunk-relative word as absolute ``{word, start, end, score}``, clipped to the segment."""
    return {
        "word": word.word,
        "start": round(min(end, start + word.start), 3),
        "end": round(min(end, start + word.end), 3),
        "score": word.score,
    }


# A looping chunk is decoded again with beam search that may not repeat any sequence of this many
# tokens, not with Whisper's temperature fallback: CTranslate2 samples from a per-thread generator
# seeded once per process, so sampled text differs from run to run, and the same file must give
# the same words.
# 4 tokens: a loop the guard catches (5 repeats running) cannot form, speech rarely repeats 4 tokens.
REDECODE_NO_REPEAT_NGRAM = 4


def _looks_degenerate(text: str) -> bool:
    return loop_reason(text) is not None


def _redecode(model: Any, audio: np.ndarray, language: str | None, opts: DecodeOptions, looped: str) -> _Decoded:
    """faster-whisper's sequential decoding of one chunk (<= 30 s), beam search barred from
    repeating itself (``REDECODE_NO_REPEAT_NGRAM``). What still looks degenerate is dropped:
    better no words, and a note, than invented ones."""
    from pipeline.loop_guard import COMPRESSION_RATIO_THRESHOLD

    whisper = model.model
    segments, _ = whisper.transcribe(
        audio,
        language=language,
        beam_size=model.options.beam_size,
        temperature=[0.0],
        no_repeat_ngram_size=REDECODE_NO_REPEAT_NGRAM,
        compression_ratio_threshold=COMPRESSION_RATIO_THRESHOLD,
        log_prob_threshold=-1.0,
        no_speech_threshold=0.6,
        condition_on_previous_text=False,
        initial_prompt=opts.prompt or model.options.initial_prompt,
        hotwords=opts.hotwords or model.options.hotwords,
        vad_filter=False,
        without_timestamps=True,
    )
    kept: list[Any] = []
    dropped: list[Any] = []
    for seg in segments:
        (dropped if _looks_degenerate(seg.text) else kept).append(seg)
    text = " ".join(seg.text.strip() for seg in kept).strip()
    logprob = float(np.mean([seg.avg_logprob for seg in kept])) if kept else None
    why = None
    if dropped or not text:
        why = (
            f"{looped}; still looping when decoded again alone: dropped"
            if dropped
            else f"{looped}; no text when decoded again alone"
        )
    return _Decoded(text, logprob, None, True, why)
