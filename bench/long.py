#!/usr/bin/env python3
"""Long recordings: does a 3-hour file finish on one worker, in bounded memory, with progress?

Builds a ``--hours`` long 16 kHz mono WAV by concatenating the shared recordings
(``conv_2spk_10min.wav`` and ``conv_3spk_overlap_3min.wav``, in turn) with ffmpeg's concat
demuxer into a temporary directory (never committed), starts its own Redis and ONE real
worker (``-Q model,cpu --concurrency 1``), and runs, one after the other:

1. the 10-minute file (the reference), then
2. the long file,

each through ``fleet.submit`` (a job record + the chain by task names, what the shim does).

While a job runs, the worker's whole process tree (main process + the prefork child that
holds the models) is sampled every 0.5 s (psutil, else /proc) for RSS; each sample is
attributed to the stage that is running, which is the first stage in chain order whose
checkpoint artifact is not yet in the job's workspace. The job record's progress is read
at the same time; every change is kept (seconds since submission, progress, stage,
message), and the longest time without a change is reported with the stage it fell in.

Acceptance (issue "Performance"): the long job completes; peak worker RSS <= 3 GB and
<= 1.5x the 10-minute file's peak on the same worker.

A worker whose RSS passes ``--rss-limit-gb`` (default 12) is killed and the job reported as
``aborted_rss`` with the stage it was in.

usage: python -m bench.long [--hours 3] [--keep DIR]        # --hours 0.5 first: memory scaling
       python -m bench.long --hours 0.05 --skip-reference   # smoke
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    SHARED,
    BenchFleet,
    TreeRss,
    concat_wav,
    emit,
    eprint,
    exit_cleanly_on_sigterm,
    loadavg,
    shared_audio,
)
from ecg_audio.stage_table import STAGES

GB = 1024**3
ACCEPT_PEAK_BYTES = 3 * GB
ACCEPT_PEAK_RATIO = 1.5
SOURCES = ["conv_2spk_10min.wav", "conv_3spk_overlap_3min.wav"]
# chain order and each stage's checkpoint
ARTIFACTS = [(s.name, s.artifact) for s in STAGES]


def build_long_file(hours: float, dest: Path) -> Path:
    """Concatenate the shared recordings to ``hours`` hours, 16 kHz mono PCM."""
    from pipeline.media import probe

    target = hours * 3600.0
    sources = [shared_audio(n) for n in SOURCES if (SHARED / "audio" / n).is_file()]
    lengths = [float(probe(p).duration or 0.0) for p in sources]
    listing: list[Path] = []
    total, i = 0.0, 0
    while total < target:
        listing.append(sources[i % len(sources)])
        total += lengths[i % len(sources)]
        i += 1
    return concat_wav(listing, target, dest)


def running_stage(workspace: Path) -> str:
    for stage, artifact in ARTIFACTS:
        if not (workspace / artifact).exists():
            return stage
    return "done"


def run_job(
    fleet: BenchFleet, rss: TreeRss, source: str, timeout_s: float, rss_limit: float = float("inf")
) -> dict[str, Any]:
    """Submit, then sample RSS per stage and the record's progress every 0.5 s until the job ends.

    A worker whose tree passes ``rss_limit`` bytes is killed (SIGKILL to its process group) and
    the job reported as ``aborted_rss``: the machine is shared, and the OOM killer would pick
    a victim of its own.
    """
    job = fleet.submit(source)
    ws = fleet.var / "workspaces" / job
    t0 = time.monotonic()
    peak_by_stage: dict[str, int] = {}
    growth_by_stage: dict[str, int] = {}
    high_water = rss.rss_now()
    progress: list[list[Any]] = []
    last = None
    status = "queued"
    seen_ws = False
    while time.monotonic() - t0 < timeout_s:
        now = rss.rss_now()
        seen_ws = seen_ws or ws.exists()
        # the workspace is removed when the job completes
        stage = running_stage(ws) if ws.exists() else ("done" if seen_ws else "queued")
        peak_by_stage[stage] = max(peak_by_stage.get(stage, 0), now)
        if now > high_water:
            # which stage pushed the worker's high-water mark up, and by how much
            growth_by_stage[stage] = growth_by_stage.get(stage, 0) + now - high_water
            high_water = now
        rec = fleet.store.get(job)
        if rec is not None:
            status = rec.status
            key = (rec.progress, rec.stage, rec.message)
            if key != last:
                progress.append([round(time.monotonic() - t0, 1), rec.progress, rec.stage, rec.message])
                last = key
        if status in ("completed", "failed"):
            break
        if now > rss_limit:
            status = f"aborted_rss: {now / GB:.2f} GB in {stage}"
            for name in list(fleet.workers):
                fleet.kill_worker(name)
            break
        time.sleep(0.5)
    wall = time.monotonic() - t0
    # the longest stretch without a visible change of the job record
    stamps = [p[0] for p in progress] + [round(wall, 1)]
    gaps = [(stamps[k + 1] - stamps[k], progress[k][2], progress[k][1]) for k in range(len(progress))]
    worst = max(gaps, default=(0.0, None, None))
    md = ((fleet.store.get_result(job) or {}).get("result") or {}).get("metadata", {})
    rec = fleet.store.get(job)
    return {
        "job_id": job,
        "status": status,
        "error": (rec.error_code, rec.error_message) if rec and rec.status == "failed" else None,
        "wall_s": round(wall, 1),
        "audio_s": md.get("duration"),
        "stage_times": md.get("stage_times"),
        "peak_rss_gb_by_stage": {k: round(v / GB, 3) for k, v in peak_by_stage.items()},
        "rss_high_water_growth_gb_by_stage": {k: round(v / GB, 3) for k, v in growth_by_stage.items()},
        "peak_rss_gb": round(max(peak_by_stage.values(), default=0) / GB, 3),
        "progress": progress,
        "longest_without_progress_s": round(worst[0], 1),
        "longest_without_progress_after": {"stage": worst[1], "progress": worst[2]},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=3.0)
    ap.add_argument("--skip-reference", action="store_true", help="do not run the 10-minute reference job")
    ap.add_argument("--reference-seconds", type=float, default=None, help="cut the reference to N seconds")
    ap.add_argument("--timeout-h", type=float, default=6.0)
    ap.add_argument("--rss-limit-gb", type=float, default=12.0, help="kill the worker past this (shared machine)")
    ap.add_argument("--keep", help="keep logs, workspaces and the long file in this directory")
    a = ap.parse_args()
    exit_cleanly_on_sigterm()
    ref_src = shared_audio("conv_2spk_10min.wav")

    with tempfile.TemporaryDirectory(prefix="ecg-bench-long-") as tmp:
        var = Path(a.keep or tmp)
        var.mkdir(parents=True, exist_ok=True)
        eprint(f"long: building a {a.hours} h file")
        t_build = time.monotonic()
        long_wav = build_long_file(a.hours, var / f"long-{a.hours}h.wav")
        build_s = time.monotonic() - t_build
        fleet = BenchFleet(var / "fleet", extra_env={"ECG_MAX_DURATION_S": str(int(a.hours * 3600 + 600))})
        try:
            worker = fleet.start_worker("w1")
            fleet.wait_workers(1)
            rss = TreeRss(worker.pid).start()
            idle_rss = rss.rss_now()
            eprint(f"long: worker ready, RSS {idle_rss / GB:.2f} GB")
            ref: dict[str, Any] | None = None
            if not a.skip_reference:
                ref_file = ref_src
                if a.reference_seconds:
                    from stages import cut

                    ref_file = cut(ref_src, a.reference_seconds, var)
                eprint("long: the 10-minute reference job")
                ref = run_job(fleet, rss, fleet.place_upload(ref_file), 3600)
                eprint(f"long: reference: {ref['status']} in {ref['wall_s']} s, peak {ref['peak_rss_gb']} GB")
            load_before = loadavg()
            eprint(f"long: the {a.hours} h job")
            big = run_job(fleet, rss, fleet.place_upload(long_wav), a.timeout_h * 3600, a.rss_limit_gb * GB)
            load_after = loadavg()
            eprint(f"long: {big['status']} in {big['wall_s']} s, peak {big['peak_rss_gb']} GB")
            rss.stop()
        finally:
            fleet.close()
    peak = big["peak_rss_gb"] * GB
    ratio = (big["peak_rss_gb"] / ref["peak_rss_gb"]) if ref and ref["peak_rss_gb"] else None
    growth = big["rss_high_water_growth_gb_by_stage"]
    out = {
        "bench": "long",
        "hours": a.hours,
        "build_s": round(build_s, 1),
        "worker": "-Q model,cpu --concurrency 1",
        "worker_idle_rss_gb": round(idle_rss / GB, 3),
        "reference": ref and {k: v for k, v in ref.items() if k != "progress"},
        "long": big,
        "peak_ratio_long_over_10min": round(ratio, 3) if ratio else None,
        "heaviest_stage": max(growth, key=growth.get) if growth else None,  # type: ignore[arg-type]
        "accept": {"completes": True, "peak_rss_gb_le": 3.0, "ratio_le": ACCEPT_PEAK_RATIO},
        "meets_completes": big["status"] == "completed",
        "meets_peak": peak <= ACCEPT_PEAK_BYTES,
        "meets_ratio": (ratio <= ACCEPT_PEAK_RATIO) if ratio else None,
    }
    emit(out, load_before, load_after)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
