#!/usr/bin/env python3
"""Our whole pipeline against the WhisperX CLI's ASR alone, on the same file, in one run.

Each round runs both, one after the other (the order alternates from round to round, so a
load that rises or falls during the run touches both alike):

- ours: ``python -m bench.stages`` in a fresh process (the in-process stage total: diarize,
  transcribe with word times, align, features, merge; models loaded before its clock starts);
- the peer: the ``whisperx`` CLI, ASR only, with the same embedded tiny.en:
  ``--model <tiny.en directory> --compute_type int8 --batch_size 8 --language en --no_align
  --vad_method pyannote --device cpu``; its wall includes its model load (what a user of the
  CLI waits for).

Prints one JSON line: both walls per round, their medians and ratio (ours / peer), the CPU's
model name and flags, ONEDNN_MAX_CPU_ISA and the other kernel caps if set (``forced_env``),
the compute type ``auto`` chooses here, and the load averages. ``--avx2`` runs both sides with
the kernels of an AVX2-only CPU (``worker.cpu.AVX2_ONLY_ENV``) on an AVX-512 machine.
Acceptance (issue 25): ratio ≤ 0.85 on an AVX2-only CPU (≤ 0.75 with AVX-512) and our total
≤ 50 s for the 601 s ``conv_2spk_10min.wav``.

usage: python -m bench.peer [--file conv_2spk_10min.wav] [--rounds 3] [--seconds S] [--avx2]

``--seconds S`` cuts the first S seconds (a quick run). Exits 2 when the recording is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import AVX2_HELP, cut, emit, loadavg, reexec_as_avx2_machine, shared_audio

FLAGS_SHOWN = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
ACCEPT_RATIO = {"avx2": 0.85, "avx512": 0.75}


def peer_command(audio: Path, model_dir: str, out_dir: Path) -> list[str]:
    """The WhisperX CLI, ASR only, as issue 25 runs it."""
    exe = shutil.which("whisperx", path=str(Path(sys.executable).parent)) or shutil.which("whisperx")
    if exe is None:
        print("peer: the whisperx CLI is not installed (pip install whisperx)", file=sys.stderr)
        raise SystemExit(2)
    return [
        exe,
        str(audio),
        "--model", model_dir,
        "--compute_type", "int8",
        "--batch_size", "8",
        "--language", "en",
        "--no_align",
        "--vad_method", "pyannote",
        "--device", "cpu",
        "--output_dir", str(out_dir),
        "--output_format", "json",
    ]  # fmt: skip


def run_ours(file: str, seconds: float | None) -> dict[str, Any]:
    """bench.stages in a process of its own: its JSON line (stage total, models, load time)."""
    cmd = [sys.executable, "-m", "bench.stages", "--file", file]
    if seconds:
        cmd += ["--seconds", str(seconds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"peer: bench.stages failed ({proc.returncode})")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def ffmpeg_on_path(tmp: Path) -> dict[str, str]:
    """An environment whose PATH has an ``ffmpeg``: WhisperX runs the one on PATH, where we use
    imageio-ffmpeg's when there is none (pipeline.media.ffmpeg_exe)."""
    from pipeline.media import ffmpeg_exe

    env = dict(os.environ)
    if shutil.which("ffmpeg") is None:
        link = tmp / "bin" / "ffmpeg"
        link.parent.mkdir(exist_ok=True)
        if not link.exists():
            link.symlink_to(ffmpeg_exe())
        env["PATH"] = f"{link.parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_peer(audio: Path, model_dir: str, tmp: Path) -> float:
    out_dir = Path(tempfile.mkdtemp(dir=tmp, prefix="whisperx-"))
    env = ffmpeg_on_path(tmp)
    t0 = time.perf_counter()
    proc = subprocess.run(peer_command(audio, model_dir, out_dir), capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not any(out_dir.glob("*.json")):
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"peer: the whisperx CLI failed ({proc.returncode})")
    return wall


def cpu_description() -> dict[str, Any]:
    from worker.cpu import AVX2_ONLY_ENV, auto_compute_type, cpu_flags, cpu_model_name

    flags = cpu_flags()
    return {
        "cpu": cpu_model_name(),
        "cpu_flags": {f: f in flags for f in FLAGS_SHOWN},
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "forced_env": {k: os.environ[k] for k in AVX2_ONLY_ENV if k in os.environ},
        "compute_type_auto": auto_compute_type("cpu"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default="conv_2spk_10min.wav", help="a file in ../shared/audio")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (ours, peer), order alternating")
    ap.add_argument("--seconds", type=float, default=None, help="only the first S seconds (a quick run)")
    ap.add_argument("--avx2", action="store_true", help=AVX2_HELP)
    a = ap.parse_args()
    if a.avx2:
        reexec_as_avx2_machine()
    src = shared_audio(a.file)
    from pipeline.asr_models import embedded_asr_path

    model_dir = str(embedded_asr_path())
    ours: list[dict[str, Any]] = []
    peer: list[float] = []
    with tempfile.TemporaryDirectory(prefix="ecg-bench-peer-") as tmp_name:
        tmp = Path(tmp_name)
        audio = cut(src, a.seconds, tmp) if a.seconds else src
        load_before = loadavg()
        for i in range(a.rounds):
            for side in ("ours", "peer") if i % 2 == 0 else ("peer", "ours"):
                if side == "ours":
                    ours.append(run_ours(a.file, a.seconds))
                    print(f"peer: round {i + 1}: ours {ours[-1]['total_s']} s", file=sys.stderr)
                else:
                    peer.append(run_peer(audio, model_dir, tmp))
                    print(f"peer: round {i + 1}: whisperx {peer[-1]:.1f} s", file=sys.stderr)
        load_after = loadavg()
    ours_total = [float(r["total_s"]) for r in ours]
    ours_med, peer_med = statistics.median(ours_total), statistics.median(peer)
    cpu = cpu_description()
    avx512 = cpu["cpu_flags"]["avx512f"] and cpu["onednn_max_cpu_isa"] in (None, "", "ALL")
    accept = ACCEPT_RATIO["avx512" if avx512 else "avx2"]
    ratio = ours_med / peer_med if peer_med > 0 else None
    out = {
        "bench": "peer",
        "file": a.file,
        "audio_s": ours[0]["audio_s"],
        "rounds": a.rounds,
        **cpu,
        "ours_total_s": ours_total,
        "ours_transcribe_s": [r["stages"]["transcribe"]["seconds"] for r in ours],
        "ours_model_load_s": [r["model_load_s"] for r in ours],
        "ours_models": ours[0].get("models"),
        "peer_wall_s": [round(w, 2) for w in peer],
        "ours_median_s": round(ours_med, 2),
        "peer_median_s": round(peer_med, 2),
        "ratio": round(ratio, 3) if ratio is not None else None,
        "accept_ratio_le": accept if not a.seconds else None,
        "meets_ratio": (ratio is not None and ratio <= accept) if not a.seconds else None,
    }
    emit(out, load_before, load_after)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
