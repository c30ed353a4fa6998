#!/usr/bin/env python3
"""Per-stage seconds on a CUDA device in fp16, and peak GPU memory: one prepared run.

For a GPU machine (none was lent when it was written; it is safe to run anywhere): with
no CUDA device it prints ``{"skipped": "no CUDA device"}`` and exits 0.

Sets ``ECG_DEVICE=cuda`` and ``ECG_COMPUTE_TYPE=float16`` (unless already set), loads the
models once, runs ``ecg_cli.runner.analyze`` on a 10 s warm-up clip (CUDA kernels and
cuDNN autotuning happen on the first call and are not what a warm worker pays), then on
``conv_2spk_10min.wav`` ``--reps`` times, and reports for the median run each stage's
seconds and real-time factor (``metadata.stage_times``), plus
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` (peak over the measured
runs, reset after the warm-up) and the device's used memory seen by ``nvidia-smi`` (when
present) sampled every 0.5 s. Then ``korean_conv_24s.wav`` once: the language identified and
the ASR model that decoded it (``large-v3-turbo`` in an image built with
``--build-arg ASR_MODEL=large-v3-turbo``), and the ASR models resident after both. The whole
script stops itself after ``--budget-s`` (default 480 s = 8 minutes) and prints what it has, with ``"truncated": true``.

usage: bench/gpu.py [--reps 1] [--budget-s 480] [--file conv_2spk_10min.wav]
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
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import SHARED
from ecg_audio.stage_table import STAGE_NAMES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

SHARED_AUDIO = SHARED / "audio"
MIB = 1024**2


class SmiSampler:
    """Peak ``memory.used`` of GPU 0 per nvidia-smi, every ``interval_s`` (absent tool: None)."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.exe = shutil.which("nvidia-smi")
        self.peak_mib: int | None = None
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    [str(self.exe), "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout.strip()
                used = int(out.splitlines()[0])
                self.peak_mib = max(self.peak_mib or 0, used)
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                pass
            self._stop.wait(self.interval_s)

    def start(self) -> SmiSampler:
        if self.exe:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--file", default="conv_2spk_10min.wav", help="a file in ../shared/audio")
    a = ap.parse_args()
    from ecg_audio.logs import configure_logging

    configure_logging("INFO", json_output=False)  # to stderr: stdout carries only the JSON line
    started = time.monotonic()

    try:
        import torch
    except ImportError:
        print(json.dumps({"skipped": "torch is not installed"}))
        return 0
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0

    from stages import cut, shared_audio

    src = shared_audio(a.file)
    os.environ.setdefault("ECG_DEVICE", "cuda")
    os.environ.setdefault("ECG_COMPUTE_TYPE", "float16")
    out: dict[str, Any] = {
        "bench": "gpu",
        "file": a.file,
        "device_name": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "ECG_DEVICE": os.environ["ECG_DEVICE"],
        "ECG_COMPUTE_TYPE": os.environ["ECG_COMPUTE_TYPE"],
        "truncated": False,
    }

    # a watchdog: print what there is and leave when the budget is spent
    def watchdog() -> None:
        time.sleep(max(1.0, a.budget_s - (time.monotonic() - started)))
        out["truncated"] = True
        print(json.dumps(out), flush=True)
        os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    smi = SmiSampler().start()

    from ecg_audio.settings import get_settings
    from ecg_cli.runner import analyze
    from worker.models import get_registry

    settings = get_settings()
    t0 = time.perf_counter()
    registry = get_registry(settings)
    registry.preload()
    out["model_load_s"] = round(time.perf_counter() - t0, 1)
    out["registry_device"] = registry.device
    print(f"gpu: models loaded in {out['model_load_s']} s on {registry.device}", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="ecg-bench-gpu-") as tmp:
        warm = cut(src, 10.0, Path(tmp))
        t0 = time.perf_counter()
        analyze(str(warm), settings=settings, registry=registry)
        out["warmup_s"] = round(time.perf_counter() - t0, 2)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        runs = []
        for i in range(a.reps):
            t0 = time.perf_counter()
            env = analyze(str(src), settings=settings, registry=registry)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            md = env["result"]["metadata"]
            runs.append({"wall_s": wall, "duration": md["duration"], "stage_times": md["stage_times"]})
            print(f"gpu: rep {i + 1}: {wall:.1f} s {md['stage_times']}", file=sys.stderr)
            duration = float(md["duration"])
            out["audio_s"] = round(duration, 1)
            out["stages"] = {
                name: {
                    "seconds": round(s := statistics.median(float(r["stage_times"].get(name, 0.0)) for r in runs), 3),
                    "rtf": round(s / duration, 5),
                }
                for name in STAGE_NAMES
            }
            out["wall_s"] = round(statistics.median(r["wall_s"] for r in runs), 2)
            out["reps_done"] = len(runs)
            out["device_reported"] = md.get("device")
            out["models"] = md.get("models")
            out["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
            out["max_memory_reserved_mib"] = round(torch.cuda.max_memory_reserved() / MIB, 1)
            out["nvidia_smi_peak_used_mib"] = smi.peak_mib
        # the multilingual default (an image built with --build-arg ASR_MODEL=large-v3-turbo):
        # a real Korean recording, language identified, and which model decoded it
        korean = SHARED_AUDIO / "korean_conv_24s.wav"
        if korean.exists():
            t0 = time.perf_counter()
            md = analyze(str(korean), settings=settings, registry=registry)["result"]["metadata"]
            out["korean"] = {
                "wall_s": round(time.perf_counter() - t0, 2),
                "language": md.get("language"),
                "language_probability": md.get("language_probability"),
                "asr": md.get("models", {}).get("asr"),
            }
        out["asr_resident"] = getattr(registry, "resident_asr", list)()
    smi.stop()
    out["nvidia_smi_peak_used_mib"] = smi.peak_mib
    out["note"] = (
        "max_memory_allocated counts torch's allocator only (pyannote, torch parts of WhisperX); "
        "CTranslate2 (faster-whisper) allocates outside it and shows only in nvidia-smi"
    )
    print(json.dumps(out), flush=True)
    os._exit(0)  # the watchdog thread must not print a second line


if __name__ == "__main__":
    raise SystemExit(main())
