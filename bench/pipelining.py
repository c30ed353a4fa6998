#!/usr/bin/env python3
"""Pipelining: does the model worker wait while CPU stages run?

Starts its own Redis, ONE model worker (``-Q model --concurrency 1``) and ONE CPU worker
(``-Q cpu --concurrency 1``), queues ``--jobs`` (default 10) jobs at once on short clips
cut from ``conv_2spk_10min.wav`` (``--clip-seconds``, default 60, each from a different
offset), and waits for all of them.

How busy the model worker was is read from Celery's own task events (the workers send
them: ``worker_send_task_events = True`` in celeryconfig): a receiver thread in this bench
(``app.events.Receiver``) collects ``task-started`` and ``task-succeeded`` of every task;
each model-queue task (diarize, transcribe, align; the stage is in the task id
``{job_id}:{stage}:{nonce}``) gives one busy interval between the two timestamps, both
taken by the worker's clock. Chosen because it needs nothing from the worker's logging
and is what Flower shows; the interval covers the task wrapper too (job-record read,
stage lease: a few ms), which is time the model worker is not free either. (The model
worker's ``stage_done`` log lines would have served, but structlog output of the prefork
child does not reach the worker's stderr under ``celery worker``; see bench/README.md.)
The busy intervals are merged (one process, so they should not overlap) and divided by:

* ``model_window``: first model stage start -> last model stage end (the acceptance
  figure: in that window, the model worker always has work);
* ``whole_run``: first submission -> last job completed (includes the first ingest
  and the last features+merge, which nothing can overlap).

Acceptance (issue "Performance"): model-busy fraction >= 0.85.

usage: python -m bench.pipelining [--jobs 10] [--clip-seconds 60] [--keep DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import BenchFleet, emit, eprint, exit_cleanly_on_sigterm, loadavg, place_clip, shared_audio
from ecg_audio.queues import MODEL_QUEUE
from ecg_audio.stage_table import STAGES

ACCEPT_BUSY = 0.85
MODEL_STAGES = {s.name for s in STAGES if s.queue == MODEL_QUEUE}


def make_clips(src: Path, uploads: Path, n: int, seconds: float, total_s: float) -> list[str]:
    """``n`` clips of ``seconds`` from evenly spread offsets, placed as uploads."""
    uploads.mkdir(parents=True, exist_ok=True)
    step = max(0.0, (total_s - seconds) / max(1, n - 1))
    return [place_clip(src, uploads, i * step, seconds) for i in range(n)]


class TaskEvents:
    """Collects task-started / task-succeeded events in a thread (Celery's event receiver)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.started: dict[str, float] = {}
        self.spans: list[tuple[float, float, str, str]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        if not self.ready.wait(30):
            raise RuntimeError("the event receiver did not start")

    def _on_event(self, ev: dict[str, Any]) -> None:
        kind, uuid_ = ev.get("type"), str(ev.get("uuid", ""))
        with self.lock:
            if kind == "task-started":
                self.started[uuid_] = float(ev["timestamp"])
            elif kind == "task-succeeded" and uuid_ in self.started:
                job_id, stage, _ = (uuid_.rsplit(":", 2) + ["", ""])[:3]
                self.spans.append((self.started.pop(uuid_), float(ev["timestamp"]), stage, job_id))

    def _run(self) -> None:
        try:
            with self.app.connection() as conn:
                recv = self.app.events.Receiver(conn, handlers={"*": self._on_event})
                self.ready.set()
                recv.capture(limit=None, timeout=None, wakeup=False)
        except Exception as e:  # Redis stopped at the end of the bench
            eprint(f"pipelining: event receiver stopped: {type(e).__name__}")

    def busy_intervals(self) -> list[tuple[float, float, str, str]]:
        """(start, end, stage, job_id) of every task that succeeded."""
        with self.lock:
            return sorted(self.spans)


def merged_length(spans: list[tuple[float, float]]) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(spans):
        if cur_e is None or s > cur_e:
            if cur_e is not None and cur_s is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None and cur_s is not None:
        total += cur_e - cur_s
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--clip-seconds", type=float, default=60.0)
    ap.add_argument("--file", default="conv_2spk_10min.wav", help="a file in ../shared/audio")
    ap.add_argument("--keep", help="keep logs and workspaces in this directory")
    a = ap.parse_args()
    exit_cleanly_on_sigterm()
    src = shared_audio(a.file)

    with tempfile.TemporaryDirectory(prefix="ecg-bench-pipe-") as tmp:
        var = Path(a.keep or tmp)
        var.mkdir(parents=True, exist_ok=True)
        fleet = BenchFleet(var / "fleet")
        from pipeline.media import probe

        total_s = float(probe(src).duration or 600.0)
        try:
            clips = make_clips(src, fleet.uploads, a.jobs, a.clip_seconds, total_s)
            fleet.start_worker("model", "model")
            fleet.start_worker("cpu", "cpu")
            fleet.wait_workers(2)
            events = TaskEvents(fleet.app)
            # a warm-up job: the first call into each model builds lazy state; not counted
            warm = fleet.submit(clips[0])
            if fleet.wait_all([warm], 900).get(warm) != "completed":
                raise RuntimeError("the warm-up job did not complete; see the worker logs in --keep")
            load_before = loadavg()
            t0 = time.time()
            ids = [fleet.submit(c) for c in clips]
            status = fleet.wait_all(ids, 3600)
            records = [rec for rec in (fleet.store.get(j) for j in ids) if rec is not None]
            t1 = max((rec.updated_at for rec in records), default=time.time())
            load_after = loadavg()
            time.sleep(1.0)  # the last events
            spans = [s for s in events.busy_intervals() if s[3] in ids]
        finally:
            fleet.close()
    model_spans = [(s, e) for s, e, stage, _ in spans if stage in MODEL_STAGES]
    if not model_spans:
        eprint("pipelining: no stage_done lines in the model worker's log")
        return 1
    busy = merged_length(model_spans)
    window = max(e for _, e in model_spans) - min(s for s, _ in model_spans)
    gaps = sorted(
        (b[0] - a_[1] for a_, b in zip(sorted(model_spans), sorted(model_spans)[1:], strict=False)), reverse=True
    )
    per_stage: dict[str, float] = {}
    for s, e, stage, _ in spans:
        per_stage[stage] = per_stage.get(stage, 0.0) + (e - s)
    out: dict[str, Any] = {
        "bench": "pipelining",
        "jobs": a.jobs,
        "clip_s": a.clip_seconds,
        "completed": sum(1 for v in status.values() if v == "completed"),
        "workers": "model: -Q model --concurrency 1; cpu: -Q cpu --concurrency 1",
        "model_busy_s": round(busy, 2),
        "model_window_s": round(window, 2),
        "busy_fraction_model_window": round(busy / window, 4),
        "whole_run_s": round(t1 - t0, 2),
        "busy_fraction_whole_run": round(busy / (t1 - t0), 4),
        "task_s_by_stage": {k: round(v, 2) for k, v in sorted(per_stage.items())},  # both workers
        "largest_gaps_s": [round(g, 3) for g in gaps[:5]],
        "median_gap_s": round(sorted(gaps)[len(gaps) // 2], 3) if gaps else None,
        "method": "Celery task events (task-started -> task-succeeded) of the model-queue tasks",
        "accept_busy_ge": ACCEPT_BUSY,
        "meets_busy": busy / window >= ACCEPT_BUSY,
    }
    emit(out, load_before, load_after)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
