#!/usr/bin/env python3
"""Seconds and real-time factor per stage, in process, on this machine's cores.

Runs ``ecg_cli.runner.analyze`` (the same stage bodies as the Celery tasks, no
broker) on a recording from ``../shared/audio`` and reads
``result.metadata.stage_times`` (each stage's own clock, written to the job's
``times.json``). The real-time factor of a stage is its seconds divided by the
audio's duration: 0.05 means a minute of audio takes 3 s.

Models are loaded before the clock starts (a warm worker has them), so the
total is the pipeline's, not the model loading's. ``--reps`` runs the file
several times and reports the median of each stage.

Acceptance (issue "Performance"): the whole pipeline in <= 60 s for the 601 s
``conv_2spk_10min.wav`` on 2 CPU cores.

usage: python -m bench.stages [--file conv_2spk_10min.wav] [--seconds N] [--reps 1] [--avx2]

``--seconds N`` cuts the first N seconds into a temporary file (smoke tests).
Prints one JSON line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import AVX2_HELP, cpu_now, cut, emit, loadavg, reexec_as_avx2_machine, shared_audio
from ecg_audio.stage_table import STAGE_NAMES, STAGES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

ACCEPT_TOTAL_S = 60.0


# the milestone that closes each stage (others fall inside a stage: VAD in diarize, assembling in merge)
STAGE_END_PROGRESS = {s.name: s.done.progress for s in STAGES}


def cpu_by_stage(marks: list[tuple[str, int, float]]) -> dict[str, float]:
    """CPU seconds per stage from the CPU clock read at each stage's closing milestone.

    Less sensitive to a shared machine's load than wall seconds: another process taking a
    core makes a stage slower, not costlier.
    """
    at = {p: c for _, p, c in marks}
    out, prev = {}, marks[0][2]
    for name, p in STAGE_END_PROGRESS.items():
        if p in at:
            out[name] = at[p] - prev
            prev = at[p]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default="conv_2spk_10min.wav", help="a file in ../shared/audio")
    ap.add_argument("--seconds", type=float, default=None, help="only the first N seconds (smoke test)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--avx2", action="store_true", help=AVX2_HELP)
    a = ap.parse_args()
    if a.avx2:
        reexec_as_avx2_machine()
    from ecg_audio.logs import configure_logging

    configure_logging("INFO", json_output=False)  # to stderr: stdout carries only the JSON line
    src = shared_audio(a.file)

    from ecg_audio.settings import get_settings
    from ecg_cli.runner import analyze
    from worker.models import get_registry

    settings = get_settings()
    t_load = time.perf_counter()
    registry = get_registry(settings)
    preload = getattr(registry, "preload", None)
    if callable(preload):
        preload()
    load_s = time.perf_counter() - t_load
    print(f"stages: models loaded in {load_s:.1f} s", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="ecg-bench-stages-") as tmp:
        path = cut(src, a.seconds, Path(tmp)) if a.seconds else src
        runs: list[dict[str, Any]] = []
        load_before = loadavg()
        for i in range(a.reps):
            marks: list[tuple[str, int, float]] = [("start", 0, cpu_now())]

            def on_progress(stage: str, progress: int, _msg: str, marks: list[tuple[str, int, float]] = marks) -> None:
                marks.append((stage, progress, cpu_now()))

            t0 = time.perf_counter()
            env = analyze(str(path), settings=settings, registry=registry, on_progress=on_progress)
            wall = time.perf_counter() - t0
            md = env["result"]["metadata"]
            runs.append(
                {
                    "wall_s": wall,
                    "duration": md["duration"],
                    "stage_times": md["stage_times"],
                    "cpu": cpu_by_stage(marks),
                    "models": md.get("models", {}),
                    "language": md.get("language"),
                    "language_id_s": float(md.get("language_id_s") or 0.0),
                }
            )
            print(f"stages: rep {i + 1}/{a.reps}: {wall:.1f} s {md['stage_times']}", file=sys.stderr)
        load_after = loadavg()

    duration = float(runs[0]["duration"])
    stages: dict[str, dict[str, float]] = {}
    for name in STAGE_NAMES:
        secs = statistics.median(float(r["stage_times"].get(name, 0.0)) for r in runs)
        cpu = statistics.median(float(r["cpu"].get(name, 0.0)) for r in runs)
        stages[name] = {"seconds": round(secs, 2), "rtf": round(secs / duration, 4), "cpu_s": round(cpu, 2)}
    total = statistics.median(sum(float(v) for v in r["stage_times"].values()) for r in runs)
    wall = statistics.median(r["wall_s"] for r in runs)
    language_id = statistics.median(r["language_id_s"] for r in runs)
    out = {
        "bench": "stages",
        "file": a.file,
        "audio_s": round(duration, 1),
        "reps": a.reps,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "device": getattr(registry, "device", "?"),
        "models": runs[0]["models"],  # which ASR model(s) ran, by language
        "language": runs[0]["language"],
        "model_load_s": round(load_s, 1),
        "stages": stages,
        # issue 25: identification at most 10 % of the transcribe stage
        "language_id_s": round(language_id, 2),
        "language_id_share": round(language_id / stages["transcribe"]["seconds"], 3)
        if stages["transcribe"]["seconds"] > 0
        else None,
        "total_s": round(total, 2),
        "total_rtf": round(total / duration, 4),
        "wall_s": round(wall, 2),
        "cpu_s": round(statistics.median(sum(r["cpu"].values()) for r in runs), 2),
        "accept_total_le_s": ACCEPT_TOTAL_S if not a.seconds else None,
        "meets_total": (total <= ACCEPT_TOTAL_S) if not a.seconds else None,
    }
    emit(out, load_before, load_after)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
