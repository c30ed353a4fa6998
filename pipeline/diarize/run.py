"""One pass of a diarization pipeline over audio in memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.audio import SAMPLE_RATE
from pipeline.diarize.result import DiarizationResult, to_result
from pipeline.errors import ProcessingError


def diarize(
    pipeline: Any,
    audio: np.ndarray,
    *,
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
    hook: Callable[[str, float], None] | None = None,
) -> DiarizationResult:
    """Who spoke when in ``audio``.

    Args:
        pipeline: from :func:`load_diarization_pipeline`.
        audio: float32 mono 16 kHz, shape (num_samples,).
        num_speakers: exact number of speakers, when known.
        min_speakers, max_speakers: bounds on the number of speakers.
        hook: ``hook(step_name, fraction_done)`` after segmentation (voice activity),
            during and after embeddings, and after clustering.
    """
    clustering = getattr(pipeline, "clustering", None)
    if clustering is not None and hasattr(clustering, "speaker_stats"):
        clustering.speaker_stats = None
    annotation, exclusive, centroids = apply_pipeline(
        pipeline,
        audio,
        num_speakers=num_speakers,
        min_speakers=min_speakers,
        max_speakers=max_speakers,
        hook=ProgressHook(hook) if hook is not None else None,
    )
    stats = getattr(clustering, "speaker_stats", None)
    voices = {}
    for i, label in enumerate(annotation.labels()):
        known = speaker_vector(i, centroids, stats)
        if known is not None:
            voices[str(label)] = known[0]
    result = to_result(annotation, exclusive, voices)
    if hook is not None:
        hook("done", 1.0)
    return result


def apply_pipeline(
    pipeline: Any,
    audio: np.ndarray,
    *,
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
    hook: Callable[..., Any] | None = None,
) -> tuple[Any, Any | None, np.ndarray | None]:
    """Run ``pipeline`` on ``audio``: (annotation, exclusive annotation or None, speaker
    embeddings or None), the embeddings' rows in the order of ``annotation.labels()``."""
    import torch
    from pyannote.core import Annotation

    if audio.ndim != 1:
        raise ProcessingError(f"diarize expects mono audio of shape (num_samples,), got {audio.shape}")
    waveform = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None]
    # shape: (1, num_samples); pyannote decodes file paths with torchcodec, so never pass one
    file = {"waveform": waveform, "sample_rate": SAMPLE_RATE, "uri": "audio"}
    with torch.inference_mode():
        output = pipeline(
            file,
            num_speakers=num_speakers,
            min_speakers=min_speakers,
            max_speakers=max_speakers,
            hook=hook,
        )
    if isinstance(output, Annotation):
        return output, None, None
    embeddings = getattr(output, "speaker_embeddings", None)
    return output.speaker_diarization, output.exclusive_speaker_diarization, embeddings


def speaker_vector(
    row: int, centroids: np.ndarray | None, stats: list[Any] | None
) -> tuple[np.ndarray, int, bool] | None:
    """What the pipeline knows of the voice of its ``row``-th speaker: ``(vector, count, exact)``.

    exact: ``vector`` is the sum of the clustering's ``count`` unit-length training embeddings of
    that speaker (``CampplusClustering.speaker_stats``); otherwise its centroid scaled to unit
    length (count 1). None when the pipeline gave no centroid for it.
    """
    if centroids is None or row >= len(centroids):
        return None
    centroid = np.asarray(centroids[row], dtype=np.float64)
    norm = float(np.linalg.norm(centroid))
    if not np.isfinite(norm) or norm == 0.0:
        # pyannote pads zero centroids for speakers its clustering did not produce
        return None
    for known, total, count in stats or []:
        if count > 0 and np.array_equal(np.asarray(known, dtype=np.float64), centroid):
            return np.asarray(total, dtype=np.float64), int(count), True
    return centroid / norm, 1, False


class ProgressHook:
    """Turns pyannote's ``hook(step_name, artifact, file=..., total=..., completed=...)``
    into ``hook(step_name, fraction_done)``."""

    # fraction of the work done when each step starts / ends (embeddings dominate)
    SPANS = {"segmentation": (0.0, 0.3), "embeddings": (0.3, 0.95), "discrete_diarization": (0.95, 0.98)}

    def __init__(self, hook: Callable[[str, float], None]) -> None:
        self.hook = hook

    def __call__(
        self,
        step_name: str,
        step_artifact: Any,
        file: Any = None,
        total: int | None = None,
        completed: int | None = None,
    ) -> None:
        if step_name not in self.SPANS:
            return
        start, end = self.SPANS[step_name]
        if total and completed is not None:
            fraction = start + (end - start) * min(1.0, completed / total)
            if completed < total:
                self.hook(step_name, round(fraction, 3))
        elif step_artifact is not None:
            self.hook(step_name, end)
