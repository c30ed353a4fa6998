"""Which language each stretch of speech is in, and where a chunk changes language.

Speech is decoded in chunks of up to 30 s, and a chunk that holds the end of
one language and the start of another was decoded as one of them: Whisper drops (or
translates) the rest. When the diarization's turns are known, a chunk with two or more
speaker runs is probed twice, on its first and on its last run; only when the two disagree
is every run of that chunk identified, and the chunk is cut where the language changes.
A chunk of one speaker is probed once, as before. Probes are encoded at their own length
(rounded up to ``PROBE_STEP_FRAMES``; CTranslate2's Whisper encoder takes inputs shorter
than 30 s, and its cost falls faster than the length), so a chunk's two short speaker runs
cost about what one 15 s probe did.

Every probe is first read on its first ``QUICK_FRAMES`` (5 s), a third of the encoder's work;
only the probes that name another language than the window's majority are read again on
``IDENTIFY_FRAMES``. A 5 s read is right about the language a probe shares with its neighbours;
where it goes astray (synthetic or mumbled speech called Latin, Finnish or Thai) or where the
language really changes, the long read decides, as it did for every probe before.

The last runs are read only in a window that may change language: one whose chunks' first runs
do not all name one language, or one of at most ``TAILS_ALWAYS_CHUNKS`` chunks. In a long
window whose every chunk begins in one language (a meeting in one language, the common case)
the language is decided for the window at half the cost; a switch there that no chunk begins
with, and that Whisper leaves without words, is found by the transcription's second pass
(speech without words is decoded again alone, its language identified anew).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.audio import SAMPLE_RATE
from pipeline.parallel_decode import even_batches, model_streams, parallel_map

# A chunk keeps a language of its own (not its window's) only when Whisper is this sure of it and
# the chunk is this long: short or unsure chunks are where language identification errs.
CHUNK_LANGUAGE_MIN_P = 0.7
CHUNK_LANGUAGE_MIN_S = 2.0
# Language identification reads at most the first 15 s of a piece: CTranslate2's Whisper encoder takes
# shorter inputs than 30 s, and its cost falls faster than the length (attention); the identified
# language stays the same, with a somewhat lower probability.
IDENTIFY_FRAMES = 1500
QUICK_FRAMES = 500  # the first read of every chunk's probe (see the module's docstring)
MEL_TAIL = 400  # zeros after the last sample read: two STFT windows (n_fft 400, centred)
# A window of more chunks than this whose chunks all begin in one language is taken to be in that
# language throughout: its chunks' last speaker runs are not read (see the module's docstring)
TAILS_ALWAYS_CHUNKS = 4
PROBE_STEP_FRAMES = 500  # probes are padded to a multiple of 5 s, so that a batch shares one length
RUN_MIN_S = 1.0  # a speaker run shorter than this takes its neighbour's language when a chunk is split
# head and tail probes both at least this sure, in two languages: the chunk switches (and the one
# that is not the window's language at least CHUNK_LANGUAGE_MIN_P: a short run of synthetic or
# mumbled English is called Welsh or Hungarian with p 0.3-0.5)
SWITCH_MIN_P = 0.5

Span = tuple[float, float]
Guess = tuple[str, float]


def identify(
    model: Any, pieces: Sequence[np.ndarray], batch_size: int, *, frames: int = IDENTIFY_FRAMES
) -> list[tuple[str, float, dict[str, float]]]:
    """(language, probability, top-10 distribution) per piece, from the first ``frames`` of each."""
    from whisperx.audio import log_mel_spectrogram

    whisper = model.model
    n_mels = whisper.feat_kwargs.get("feature_size") or 80
    out: list[tuple[str, float, dict[str, float]] | None] = [None] * len(pieces)
    by_frames: dict[int, list[int]] = {}
    for i, piece in enumerate(pieces):
        read = math.ceil(max(1, min(len(piece) // 160, frames)) / PROBE_STEP_FRAMES) * PROBE_STEP_FRAMES
        by_frames.setdefault(min(read, frames), []).append(i)
    streams = model_streams(model)
    batches = [
        (read, [idx[k] for k in part])
        for read, idx in sorted(by_frames.items())
        for part in even_batches(len(idx), batch_size, streams)
    ]

    def detect(batch: tuple[int, list[int]]) -> list[Any]:
        read, part = batch
        feats = []
        for i in part:
            piece = pieces[i][: read * 160]
            # padded only as far as the frames read need (their 400-sample windows end in
            # zeros, as in Whisper's 30 s padding): the same values, in a sixth of the STFT
            mel = log_mel_spectrogram(piece, n_mels=n_mels, padding=read * 160 - piece.shape[0] + MEL_TAIL)
            feats.append(np.asarray(mel, dtype=np.float32)[:, :read])
        return list(whisper.model.detect_language(whisper.encode(np.ascontiguousarray(np.stack(feats)))))

    for (_, part), results in zip(batches, parallel_map(streams, detect, batches), strict=True):
        for i, result in zip(part, results, strict=True):
            token, p = result[0]
            out[i] = (token[2:-2], float(p), {t[2:-2]: float(q) for t, q in result[:10]})
    return [r for r in out if r is not None]


def speaker_runs(turns: Sequence[tuple[float, float, str]], start: float, end: float) -> list[Span]:
    """Consecutive turns of one speaker joined, clipped to [start, end], relative to ``start``."""
    runs: list[list[Any]] = []
    for a, b, who in sorted(turns):
        if b <= start or a >= end:
            continue
        a, b = max(a, start) - start, min(b, end) - start
        if runs and runs[-1][2] == who:
            runs[-1][1] = max(runs[-1][1], b)
        else:
            runs.append([a, b, who])
    return [(a, b) for a, b, _ in runs]


def _inside(span: Span, runs: Sequence[Span]) -> list[Span]:
    a, b = span
    return [(max(a, ra), min(b, rb)) for ra, rb in runs if min(b, rb) - max(a, ra) >= RUN_MIN_S]


def _cut(audio: np.ndarray, span: Span, *, tail: bool = False) -> np.ndarray:
    a, b = int(span[0] * SAMPLE_RATE), int(span[1] * SAMPLE_RATE)
    n = IDENTIFY_FRAMES * 160
    return audio[max(a, b - n) : b] if tail else audio[a : min(b, a + n)]


def chunk_languages(
    model: Any, audio: np.ndarray, spans: Sequence[Span], runs: Sequence[Span], batch_size: int
) -> tuple[list[Span], list[Guess]]:
    """The chunks (``spans``, seconds into ``audio``), cut where their language changes, and
    (language, probability) for each. ``runs``: speaker runs in the same time (may be empty).

    Chunks that were not cut and are short or unsure take the window's language (the one with
    most confident speech), as a single probe of a short stretch is where identification errs."""
    if not spans:
        return [], []
    long_runs = [[r for r in _inside(span, runs) if r[1] - r[0] >= CHUNK_LANGUAGE_MIN_S] for span in spans]
    head_probes = [_cut(audio, lr[0] if lr else span) for lr, span in zip(long_runs, spans, strict=True)]
    head_found = _read(model, head_probes, batch_size)
    head_language = _majority(head_found, head_probes)
    # the tails are read where the window may change language: its heads disagree, or it is short
    mixed = len(spans) <= TAILS_ALWAYS_CHUNKS or any(res[0] != head_language for res in head_found)
    with_tail = [i for i, lr in enumerate(long_runs) if mixed and len(lr) >= 2]
    tail_probes = [_cut(audio, long_runs[i][-1], tail=True) for i in with_tail]
    tail_found = _read(model, tail_probes, batch_size, reference=head_language)
    window_language = _majority(head_found + tail_found, head_probes + tail_probes)
    heads = dict(enumerate(head_found))
    tails = dict(zip(with_tail, tail_found, strict=True))
    switching = [
        i
        for i, t in tails.items()
        if t[0] != heads[i][0]
        and min(t[1], heads[i][1]) >= SWITCH_MIN_P
        and all(p >= CHUNK_LANGUAGE_MIN_P for lang, p, _ in (t, heads[i]) if lang != window_language)
    ]
    split = _split_switching(model, audio, spans, runs, switching, batch_size, window_language)
    out_spans: list[Span] = []
    out_langs: list[Guess] = []
    for i, span in enumerate(spans):
        if i in split:
            for piece, guess in split[i]:
                out_spans.append(piece)
                out_langs.append(guess)
            continue
        lang, p, dist = heads[i]
        sure = p >= CHUNK_LANGUAGE_MIN_P and span[1] - span[0] >= CHUNK_LANGUAGE_MIN_S
        out_spans.append(span)
        out_langs.append(
            (lang, p) if sure or lang == window_language else (window_language, dist.get(window_language, 0.0))
        )
    return out_spans, out_langs


def _read(
    model: Any, probes: Sequence[np.ndarray], batch_size: int, reference: str | None = None
) -> list[tuple[str, float, dict[str, float]]]:
    """Every probe read on its first QUICK_FRAMES; those longer than that which name another
    language than ``reference`` (default: their own majority) read again on IDENTIFY_FRAMES."""
    if not probes:
        return []
    found = identify(model, probes, batch_size, frames=QUICK_FRAMES)
    reference = reference or _majority(found, probes)
    # a probe no longer than the first read has been read whole: a second read would be the same
    again = [k for k, res in enumerate(found) if res[0] != reference and len(probes[k]) // 160 > QUICK_FRAMES]
    for k, res in zip(again, identify(model, [probes[k] for k in again], batch_size), strict=True):
        found[k] = res
    return found


def _majority(found: Sequence[tuple[str, float, dict[str, float]]], probes: Sequence[np.ndarray]) -> str:
    """The language with the most confident audio among the probes."""
    weight: dict[str, float] = {}
    for (lang, p, _), probe in zip(found, probes, strict=True):
        weight[lang] = weight.get(lang, 0.0) + p * len(probe)
    return max(weight, key=lambda k: weight[k])


def _split_switching(
    model: Any,
    audio: np.ndarray,
    spans: Sequence[Span],
    runs: Sequence[Span],
    switching: list[int],
    batch_size: int,
    window_language: str,
) -> dict[int, list[tuple[Span, Guess]]]:
    """For each chunk in ``switching``: every speaker run identified, the chunk cut between runs
    of different languages. Unsure or short runs take the language of the run before them, as
    does a run in another language than the window's with less than CHUNK_LANGUAGE_MIN_P."""
    if not switching:
        return {}
    inside = {i: _inside(spans[i], runs) for i in switching}
    flat = [(i, r) for i in switching for r in inside[i]]
    found = identify(model, [_cut(audio, r) for _, r in flat], batch_size)
    per_chunk: dict[int, list[tuple[Span, str, float]]] = {}
    for (i, r), (lang, p, _) in zip(flat, found, strict=True):
        per_chunk.setdefault(i, []).append((r, lang, p))
    out: dict[int, list[tuple[Span, Guess]]] = {}
    for i, probed in per_chunk.items():
        labelled: list[tuple[Span, str, float]] = []
        for r, lang, p in probed:
            unsure = p < (SWITCH_MIN_P if lang == window_language else CHUNK_LANGUAGE_MIN_P)
            if labelled and (unsure or r[1] - r[0] < CHUNK_LANGUAGE_MIN_S):
                lang, p = labelled[-1][1], labelled[-1][2]
            labelled.append((r, lang, p))
        if labelled and labelled[0][2] < SWITCH_MIN_P:  # an unsure first run: the next sure one's
            sure = next((x for x in labelled if x[2] >= SWITCH_MIN_P), labelled[0])
            labelled[0] = (labelled[0][0], sure[1], sure[2])
        a, b = spans[i]
        pieces: list[tuple[Span, Guess]] = []
        cur_start, cur_lang, cur_p = a, labelled[0][1], labelled[0][2]
        for (prev, _, _), (r, lang, p) in zip(labelled, labelled[1:], strict=False):
            if lang != cur_lang:
                cut = (prev[1] + r[0]) / 2 if prev[1] <= r[0] else r[0]
                pieces.append(((cur_start, cut), (cur_lang, cur_p)))
                cur_start, cur_lang, cur_p = cut, lang, p
        pieces.append(((cur_start, b), (cur_lang, cur_p)))
        out[i] = pieces
    return out
