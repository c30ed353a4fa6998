"""Long files diarized in windows, one window's audio in memory at a time, speakers linked across windows."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audio import SAMPLE_RATE, load_wav, quiet_cut, release_freed_memory, wav_duration
from pipeline.diarize.result import DiarizationResult, exclusive_turns, result_from_raw
from pipeline.diarize.run import ProgressHook, apply_pipeline, diarize, speaker_vector

DIARIZE_WINDOW_S = 660.0
"""Files up to this long go through :func:`diarize` in one piece; longer ones in windows
about this long (memory stays that of one window). 11 minutes: a 10-minute recording still
goes whole; much longer windows take a worker on a 3 h file over its 3 GB budget."""
LINK_THRESHOLD = 0.35
"""Average-linkage cosine distance up to which local speakers of different windows are one
speaker (CAM++ pieces; the same scale as the pipeline's own clustering threshold)."""
CENTROID_LINK_THRESHOLD = 0.25
"""The same, for pipelines that only give one centroid per local speaker (distances between
centroids are shorter than average distances between their members)."""
MAX_FALLBACK_SEGMENTS = 20


@dataclass
class _LocalSpeaker:
    window: int
    label: str
    vector: np.ndarray | None
    """Sum of unit-length embeddings of this speaker in its window (None: unknown)."""
    count: int
    """How many embeddings ``vector`` sums."""
    exact: bool
    """True: ``vector`` sums the clustering's own training embeddings; False: one centroid
    or embeddings computed here."""


def diarize_wav(
    pipeline: Any,
    wav_path: Path | str,
    *,
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
    hook: Callable[[str, float], None] | None = None,
    window_s: float = DIARIZE_WINDOW_S,
    link_threshold: float | None = None,
) -> DiarizationResult:
    """Who spoke when in a 16 kHz mono WAV, in memory bounded by ``window_s``.

    A file no longer than ``window_s`` is read whole and goes through :func:`diarize`: the
    same result as ``diarize(pipeline, load_wav(wav_path), ...)``.

    A longer file is cut into equal windows of at most about ``window_s`` seconds, each
    ended at the quietest moment of the 15 s before its nominal end
    (:func:`pipeline.audio.quiet_cut`), and only one window's audio is in memory at a
    time. Each window is diarized on its own (``max_speakers``, or ``num_speakers``, as its
    upper bound). Its local speakers are then linked across windows by average-linkage
    clustering (:func:`link_speakers`): the linking never merges two local speakers of the
    same window; merging stops at ``link_threshold`` unless the global ``num_speakers`` /
    ``min_speakers`` / ``max_speakers`` say otherwise. Turns of one speaker that meet at
    a window join are merged; speakers are named SPEAKER_00, SPEAKER_01, ... in order of
    first speech, as :func:`diarize` does.

    What is linked: with the embedded pipeline, each local speaker's clustering
    embeddings (the sum of their unit vectors), so that the distance between two local
    speakers is the average cosine distance between their embeddings, linked at the
    pipeline's own clustering threshold (0.35, ``DEFAULT_PARAMETERS``); before linking,
    two speakers of one window closer than that are made one (pyannote's clustering
    sometimes splits a voice so, see :func:`link_speakers`). With other
    pyannote ``SpeakerDiarization`` pipelines (e.g. a pyannote/speaker-diarization-3.1
    folder loaded by :func:`load_diarization_pipeline`): the speaker centroids they
    return, at ``CENTROID_LINK_THRESHOLD``; where a pipeline returns none (``legacy``
    pipelines return a bare ``Annotation``), each local speaker is embedded here with the
    pipeline's own embedding model from up to 20 of its longest turns (at most 10 s each).
    A pipeline with no embedding model at all cannot be linked: the whole file then goes
    through :func:`diarize` at once (memory grows with the file's length).

    Args:
        pipeline: from :func:`load_diarization_pipeline`.
        wav_path: 16 kHz mono WAV (what ingest writes).
        num_speakers, min_speakers, max_speakers: as for :func:`diarize`, for the whole file.
        hook: ``hook(step_name, fraction_done)`` as for :func:`diarize`, the fraction being
            that of the whole file (monotone across windows, 1.0 with step "done" at the end).
        window_s: window length in seconds.
        link_threshold: overrides the linking threshold (see above).
    """
    total = wav_duration(wav_path)
    if total <= window_s or not hasattr(pipeline, "_embedding"):
        return diarize(
            pipeline,
            load_wav(wav_path),
            num_speakers=num_speakers,
            min_speakers=min_speakers,
            max_speakers=max_speakers,
            hook=hook,
        )
    bounds = window_bounds(wav_path, total, window_s)
    window_max = num_speakers if num_speakers is not None else max_speakers
    progress = _WindowProgress(hook, total)
    clustering = getattr(pipeline, "clustering", None)
    raw, exclusive_raw, speakers = _diarize_each_window(pipeline, wav_path, bounds, window_max, progress)

    # our pipeline: its own clustering criterion; others: distances between centroids
    exact = any(s.exact for s in speakers)
    if link_threshold is not None:
        threshold = link_threshold
    elif exact:
        threshold = float(getattr(clustering, "threshold", LINK_THRESHOLD))
    else:
        threshold = CENTROID_LINK_THRESHOLD
    dimension = next((len(s.vector) for s in speakers if s.vector is not None), 1)
    vectors = np.array(
        [s.vector if s.vector is not None else np.full(dimension, np.nan) for s in speakers], dtype=np.float64
    ).reshape(len(speakers), dimension)
    groups = link_speakers(
        vectors,
        [s.window for s in speakers],
        counts=[max(1, s.count) for s in speakers],
        threshold=threshold,
        num_speakers=num_speakers,
        min_speakers=min_speakers,
        max_speakers=max_speakers,
        within_window_threshold=threshold if exact else None,
    )
    name = {(s.window, s.label): f"G{g}" for s, g in zip(speakers, groups, strict=True)}
    # a local speaker without centroid row (no embedding) keeps a speaker of its own
    for _, _, key in raw + exclusive_raw:
        name.setdefault(key, f"W{key[0]}:{key[1]}")
    cuts = [end for _, end in bounds[:-1]]
    gap = max(0.1, float(getattr(getattr(pipeline, "segmentation", None), "min_duration_off", 0.0) or 0.0))
    glob = _join_at_cuts([(a, b, name[k]) for a, b, k in raw], cuts, gap, per_speaker=True)
    glob_exclusive = _join_at_cuts([(a, b, name[k]) for a, b, k in exclusive_raw], cuts, gap, per_speaker=False)
    # a speaker's voice over the whole file: the sum of their local speakers' embeddings
    voices: dict[str, np.ndarray] = {}
    for s, g in zip(speakers, groups, strict=True):
        if s.vector is not None:
            voices[f"G{g}"] = voices.get(f"G{g}", 0.0) + np.asarray(s.vector, dtype=np.float64)
    result = result_from_raw(glob, glob_exclusive, voices)
    if hook is not None:
        hook("done", 1.0)
    return result


_Turns = list[tuple[float, float, tuple[int, str]]]


def _diarize_each_window(
    pipeline: Any,
    wav_path: Path | str,
    bounds: list[tuple[float, float]],
    window_max: int | None,
    progress: _WindowProgress,
) -> tuple[_Turns, _Turns, list[_LocalSpeaker]]:
    """Each window diarized on its own: its turns and exclusive turns in file time, keyed by
    (window, local label), and its local speakers with what is known of their voices."""
    clustering = getattr(pipeline, "clustering", None)
    raw: _Turns = []
    exclusive_raw: _Turns = []
    speakers: list[_LocalSpeaker] = []
    for w, (start, end) in enumerate(bounds):
        audio = load_wav(wav_path, start, end)
        if clustering is not None and hasattr(clustering, "speaker_stats"):
            clustering.speaker_stats = None
        annotation, exclusive, centroids = apply_pipeline(
            pipeline, audio, max_speakers=window_max, hook=progress.window(start, end)
        )
        stats = getattr(clustering, "speaker_stats", None)
        local = [(seg.start, seg.end, str(label)) for seg, _, label in annotation.itertracks(yield_label=True)]
        if exclusive is None:
            local_exclusive = exclusive_turns(sorted(local))
        else:
            local_exclusive = [(seg.start, seg.end, str(lb)) for seg, _, lb in exclusive.itertracks(yield_label=True)]
        for i, label in enumerate(annotation.labels()):
            speaker = _local_speaker(w, str(label), i, centroids, stats)
            if speaker.vector is None:
                own = [(a, b) for a, b, lb in local_exclusive if lb == str(label)]
                vector, count = _embed_turns(pipeline, audio, own)
                speaker = _LocalSpeaker(w, str(label), vector, count, exact=False)
            speakers.append(speaker)
        raw.extend((start + a, start + b, (w, lb)) for a, b, lb in local)
        exclusive_raw.extend((start + a, start + b, (w, lb)) for a, b, lb in local_exclusive)
        del audio, annotation, exclusive
        release_freed_memory()
    return raw, exclusive_raw, speakers


def window_bounds(
    wav_path: Path | str, total: float, window_s: float, search_s: float = 15.0
) -> list[tuple[float, float]]:
    """(start, end) seconds of ``ceil(total / window_s)`` consecutive windows of about equal
    length, each ended at a quiet moment before its nominal end (:func:`quiet_cut`)."""
    num = max(1, math.ceil(total / window_s))
    search = min(search_s, total / num / 4)
    bounds: list[tuple[float, float]] = []
    start = 0.0
    for k in range(1, num + 1):
        end = total if k == num else quiet_cut(wav_path, start, total * k / num, total, search_s=search)
        bounds.append((start, end))
        start = end
    return bounds


def link_speakers(
    vectors: np.ndarray,
    windows: list[int],
    *,
    counts: list[int] | None = None,
    threshold: float = LINK_THRESHOLD,
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
    within_window_threshold: float | None = None,
) -> list[int]:
    """Group local speakers (found window by window) into speakers of the whole file.

    Average-linkage agglomerative clustering with cannot-link constraints: local speaker i
    is the sum ``vectors[i]`` of ``counts[i]`` unit-length embeddings (default 1: one
    unit-length centroid), so that ``1 - <sum_A, sum_B> / (count_A * count_B)`` is the
    average cosine distance between the embeddings of groups A and B. Two groups that hold
    speakers of the same window (``windows[i]``) are never merged. Merging stops when the
    closest mergeable pair is farther apart than ``threshold``, unless there are still more
    groups than ``num_speakers`` / ``max_speakers`` (then it goes on while a merge is
    allowed), and never goes below ``num_speakers`` / ``min_speakers`` groups. A row with
    NaN (no embedding) is at distance 1 from everything.

    ``within_window_threshold``: before linking, two speakers of the same window that are
    at most this far apart are first made one (default None: never). pyannote's clustering
    reassigns embeddings to centroids after cutting its dendrogram, so a window sometimes
    returns one voice as two local speakers closer than its own threshold (seen on a
    750 s window: 288 s + 30 s of one voice at 0.327 < 0.35); the same criterion over the
    final clusters merges them back.

    Args:
        vectors: shape (num_local_speakers, dimension).

    Returns:
        The group of each local speaker, 0, 1, ... in order of first appearance.
    """
    n = len(vectors)
    if n == 0:
        return []
    vectors = np.asarray(vectors, dtype=np.float64).reshape(n, -1)
    valid = np.all(np.isfinite(vectors), axis=1)
    v = np.where(valid[:, None], vectors, 0.0)
    count = np.ones(n) if counts is None else np.asarray(counts, dtype=np.float64)
    # unknown rows: a unit vector orthogonal to everything (distance 1); only their self-term matters
    sums = v @ v.T
    # shape: (n, n); sums[a, b] = sum of inner products between the embeddings of a and b
    window_ids = {w: j for j, w in enumerate(sorted(set(windows)))}
    member = np.zeros((n, len(window_ids)), dtype=bool)
    member[np.arange(n), [window_ids[w] for w in windows]] = True
    lower = num_speakers if num_speakers is not None else (min_speakers or 1)
    upper = num_speakers if num_speakers is not None else (max_speakers or n)
    alive = np.ones(n, dtype=bool)
    group = np.arange(n)

    def merge(a: int, b: int) -> None:
        sums[a, :] += sums[b, :]
        sums[:, a] += sums[:, b]
        count[a] += count[b]
        member[a] |= member[b]
        alive[b] = False
        group[group == b] = a

    def closest(within: bool) -> tuple[float, int, int]:
        idx = np.flatnonzero(alive)
        distance = 1.0 - sums[np.ix_(idx, idx)] / np.outer(count[idx], count[idx])
        shared = (member[idx].astype(np.int32) @ member[idx].T.astype(np.int32)) > 0
        # within: only pairs of one window; otherwise only pairs that share no window
        distance[~shared if within else shared] = np.inf
        np.fill_diagonal(distance, np.inf)
        i, j = divmod(int(np.argmin(distance)), len(idx))
        return float(distance[i, j]), int(idx[min(i, j)]), int(idx[max(i, j)])

    if within_window_threshold is not None:
        while int(alive.sum()) > max(1, lower):
            best, a, b = closest(within=True)
            if not best <= within_window_threshold:
                break
            merge(a, b)
    while int(alive.sum()) > max(1, lower):
        best, a, b = closest(within=False)
        if not np.isfinite(best) or (best > threshold and int(alive.sum()) <= upper):
            break
        merge(a, b)
    order: dict[int, int] = {}
    return [order.setdefault(int(g), len(order)) for g in group]


def _local_speaker(
    window: int, label: str, row: int, centroids: np.ndarray | None, stats: list[Any] | None
) -> _LocalSpeaker:
    """A window's speaker as the pipeline described it (vector None when it did not)."""
    known = speaker_vector(row, centroids, stats)
    if known is None:
        return _LocalSpeaker(window, label, None, 0, exact=False)
    vector, count, exact = known
    return _LocalSpeaker(window, label, vector, count, exact=exact)


def _embed_turns(pipeline: Any, audio: np.ndarray, turns: list[tuple[float, float]]) -> tuple[np.ndarray | None, int]:
    """A speaker's centroid (unit length, count 1) from the pipeline's own embedding model
    on their longest turns."""
    import torch

    embedding = getattr(pipeline, "_embedding", None)
    longest = sorted(((b - a, a, b) for a, b in turns if b - a >= 0.5), reverse=True)[:MAX_FALLBACK_SEGMENTS]
    if embedding is None or not longest:
        return None, 0
    total: np.ndarray | None = None
    count = 0
    with torch.inference_mode():
        for _, a, b in longest:
            clip = audio[int(a * SAMPLE_RATE) : int(min(b, a + 10.0) * SAMPLE_RATE)]
            waveform = torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32))[None, None]
            vector = np.asarray(embedding(waveform), dtype=np.float64).reshape(-1)
            norm = float(np.linalg.norm(vector))
            if np.isfinite(norm) and norm > 0:
                total = vector / norm if total is None else total + vector / norm
                count += 1
    if total is None or not np.linalg.norm(total) > 0:
        return None, 0
    return total / np.linalg.norm(total), 1


def _join_at_cuts(
    items: list[tuple[float, float, str]], cuts: list[float], gap: float, *, per_speaker: bool
) -> list[tuple[float, float, str]]:
    """Merge a speaker's turn that ends at a window join with their turn that starts there
    (at most ``gap`` apart); exclusive turns (``per_speaker=False``) only when no other
    turn lies between them."""
    if not cuts:
        return sorted(items)
    cut_array = np.asarray(cuts)
    eps = 1e-6

    def straddles(end: float, start: float) -> bool:
        if start - end > gap:
            return False
        return bool(np.any((cut_array >= end - eps) & (cut_array <= start + eps)))

    out: list[tuple[float, float, str]] = []
    last: dict[str, int] = {}
    for start, end, label in sorted(items):
        k = last.get(label) if per_speaker else (len(out) - 1 if out and out[-1][2] == label else None)
        if k is not None and straddles(out[k][1], start):
            out[k] = (out[k][0], max(out[k][1], end), label)
            continue
        last[label] = len(out)
        out.append((start, end, label))
    return sorted(out)


class _WindowProgress:
    """Turns each window's pyannote hook into ``hook(step, fraction of the whole file)``."""

    def __init__(self, hook: Callable[[str, float], None] | None, total: float) -> None:
        self.hook = hook
        self.total = max(total, 1e-9)
        self.last = 0.0

    def window(self, start: float, end: float) -> ProgressHook | None:
        if self.hook is None:
            return None

        def report(step: str, fraction: float) -> None:
            done = min(0.99, (start + fraction * (end - start)) / self.total)
            if done > self.last and self.hook is not None:
                self.last = done
                self.hook(step, round(done, 3))

        return ProgressHook(report)
