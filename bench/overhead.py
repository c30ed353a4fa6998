#!/usr/bin/env python3
"""The overhead budget: in-process pipeline vs shim -> Redis -> chained tasks on a warm worker.

Same file, same models, same machine, measured in one run:

* **in-process**: ``ecg_cli.runner.analyze`` in this process (models loaded once, before
  the clock; a short warm-up job first).
* **fleet**: this bench starts its own Redis (AOF on), ONE worker
  (``celery -A worker.app worker -Q model,cpu --concurrency 1``) and the shim (uvicorn, one
  process). The recording is placed in ``<var>/uploads/`` beforehand (what ``POST
  /api/uploads`` does) and the job names it ``upload://<id>``. The clock runs from the
  ``POST /api/upload-video/process-video`` to the first ``GET /jobs/{id}`` (polled every
  0.2 s) that says ``completed``. The worker is warmed with one short job first.

The two paths alternate (in-process, fleet, in-process, ...) so that a change in the
machine's load hits both alike. Prints the medians and the ratio of medians; the
acceptance figure is ``ratio <= 1.05``.

Both paths run on the same C allocator: the bench re-executes itself with the worker's
``LD_PRELOAD`` / ``MALLOC_CONF`` (jemalloc when installed, see
``ops.stack.worker_allocator_env``), so what differs is the shim, Redis and the
chain; the JSON line names the allocator.

On a loaded machine the stage bodies' own times swing by more than 5 % from run to run,
whichever path runs them. So the bench also reports, per path, the time spent outside the
stage bodies (wall - sum of ``metadata.stage_times``: model-free orchestration: Redis
round trips, chain hops, the 0.2 s polling) and ``ratio_stage_free`` = (median in-process
wall + median fleet time outside stages) / (median in-process wall + median in-process time
outside stages): the ratio that the same stage work would give without the noise.

The helpers here (``BenchFleet``: Redis + workers on chosen queues + the shim; process-tree
RSS sampling) are shared with ``long.py``, ``pipelining.py`` and ``shim_load.py``.

usage: python -m bench.overhead [--reps 3] [--file conv_2spk_10min.wav] [--seconds N] [--keep DIR] [--avx2]

``--seconds N`` uses only the first N seconds (smoke test). One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.harness import (
    AVX2_HELP,
    BenchFleet,
    cut,
    eprint,
    exit_cleanly_on_sigterm,
    loadavg,
    reexec_as_avx2_machine,
    reexec_with_worker_allocator,
    shared_audio,
    submit_and_wait,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")


ACCEPT_RATIO = 1.05


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--file", default="conv_2spk_10min.wav", help="a file in ../shared/audio")
    ap.add_argument("--seconds", type=float, default=None, help="only the first N seconds (smoke test)")
    ap.add_argument("--keep", help="keep logs and workspaces in this directory")
    ap.add_argument("--avx2", action="store_true", help=AVX2_HELP)
    a = ap.parse_args()
    if a.avx2:
        reexec_as_avx2_machine()
    reexec_with_worker_allocator()
    from ecg_audio.logs import configure_logging

    configure_logging("INFO", json_output=False)  # to stderr: stdout carries only the JSON line
    exit_cleanly_on_sigterm()
    src = shared_audio(a.file)

    import httpx

    from ecg_audio.settings import get_settings
    from ecg_cli.runner import analyze
    from worker.models import get_registry

    with tempfile.TemporaryDirectory(prefix="ecg-bench-overhead-") as tmp:
        var = Path(a.keep or tmp)
        var.mkdir(parents=True, exist_ok=True)
        path = cut(src, a.seconds, var) if a.seconds else src
        warm_clip = cut(src, 5.0, var)
        fleet = BenchFleet(var / "fleet")
        try:
            fleet.start_worker("w1")
            fleet.start_shim(1)
            eprint("overhead: loading models in this process")
            settings = get_settings()
            registry = get_registry(settings)
            registry.preload()
            fleet.wait_workers(1)
            client = httpx.Client(base_url=fleet.shim_url, timeout=30)
            eprint("overhead: warm-up jobs")
            analyze(str(warm_clip), settings=settings, registry=registry)
            submit_and_wait(client, fleet.place_upload(warm_clip))
            inproc: list[float] = []
            shim: list[float] = []
            stage_sums: list[float] = []
            inproc_stage_sums: list[float] = []
            by_stage: dict[str, dict[str, list[float]]] = {"inprocess": {}, "fleet": {}}
            load_before = loadavg()
            for i in range(a.reps):
                t0 = time.perf_counter()
                env = analyze(str(path), settings=settings, registry=registry)
                inproc.append(time.perf_counter() - t0)
                inproc_stage_sums.append(sum(env["result"]["metadata"]["stage_times"].values()))
                for k, v in env["result"]["metadata"]["stage_times"].items():
                    by_stage["inprocess"].setdefault(k, []).append(v)
                eprint(f"overhead: rep {i + 1}: in-process {inproc[-1]:.2f} s  load {loadavg()}")
                secs, state = submit_and_wait(client, fleet.place_upload(path))
                shim.append(secs)
                stage_sums.append(sum(state["result"]["metadata"]["stage_times"].values()))
                for k, v in state["result"]["metadata"]["stage_times"].items():
                    by_stage["fleet"].setdefault(k, []).append(v)
                eprint(
                    f"overhead: rep {i + 1}: fleet {shim[-1]:.2f} s (stages {stage_sums[-1]:.2f} s)  load {loadavg()}"
                )
            load_after = loadavg()
        finally:
            fleet.close()
    med_in, med_shim = statistics.median(inproc), statistics.median(shim)
    ratio = med_shim / med_in
    print(
        json.dumps(
            {
                "bench": "overhead",
                "file": a.file,
                "seconds": a.seconds,
                "reps": a.reps,
                "inprocess_s": [round(x, 2) for x in inproc],
                "fleet_s": [round(x, 2) for x in shim],
                "fleet_stage_sum_s": [round(x, 2) for x in stage_sums],
                "inprocess_stage_sum_s": [round(x, 2) for x in inproc_stage_sums],
                # time outside the stage bodies: what the shim, Redis and the chain add (in process: ~0),
                # much less sensitive to the machine's load than the walls themselves
                "fleet_outside_stages_s": [round(w - st, 2) for w, st in zip(shim, stage_sums, strict=True)],
                "inprocess_outside_stages_s": [
                    round(w - st, 2) for w, st in zip(inproc, inproc_stage_sums, strict=True)
                ],
                # where a difference between the paths' stage sums comes from
                "stage_median_s": {
                    path: {k: round(statistics.median(v), 3) for k, v in stages.items()}
                    for path, stages in by_stage.items()
                },
                "ratio_stage_free": round(
                    (med_in + statistics.median(w - st for w, st in zip(shim, stage_sums, strict=True)))
                    / (med_in + statistics.median(w - st for w, st in zip(inproc, inproc_stage_sums, strict=True))),
                    4,
                ),
                "median_inprocess_s": round(med_in, 2),
                "median_fleet_s": round(med_shim, 2),
                "ratio_of_medians": round(ratio, 4),
                "accept_ratio_le": ACCEPT_RATIO,
                "meets_ratio": ratio <= ACCEPT_RATIO,
                "poll_interval_s": 0.2,
                # both paths run on this (the worker inherits the bench's environment)
                "allocator": os.environ.get("LD_PRELOAD") or "glibc",
                "malloc_conf": os.environ.get("MALLOC_CONF"),
                "loadavg_before": load_before,
                "loadavg_after": load_after,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
