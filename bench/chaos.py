#!/usr/bin/env python3
"""Chaos bench: no job lost, none done twice, every failure explained.

Runs real processes on this machine — its own Redis (AOF on), real Celery
workers with the real models, a real callback receiver — and disturbs them:

1. ``kill``:     N jobs over 2 workers while a random worker is SIGKILLed (whole process
                 group) K times and restarted; results compared with an undisturbed run.
2. ``redis``:    Redis restarted while jobs are queued.
3. ``receiver``: the callback receiver down for a while mid-run.
4. ``sigterm``:  SIGTERM to a busy worker (warm shutdown).
5. ``many``:     many short jobs over 2 workers.
6. ``oom``:      a CUDA out-of-memory error injected in transcribe.
7. ``spot``:     a spot interruption notice (fake IMDSv2) to the worker running a model stage.
8. ``slow_receiver``:      two dispatchers, a receiver slower per POST than the dispatch lock's
                           TTL, 10 jobs' events: all delivered, in order, none twice.
9. ``crash_before_final``: the merge process killed after the result is stored, before the job
                           is reported: one final callback per job all the same.
10. ``poison``:             a stage that kills its own process on every delivery: the job fails
                           (STAGE_CRASHED) after N deliveries, its final goes out, the worker
                           serves the next job.
11. ``restart_in_place``:  a worker killed mid-job and restarted under the same name on the same
                           host: its previous life's message restored within 60 s.
12. ``redis_blip``:        Redis down 10 s while 2 stages run: all jobs complete, none stalls
                           more than 60 s.
13. ``cancel_during_merge``: a DELETE while merge runs: record and final callback agree.

Prints one JSON line of counts. ``--quick`` shrinks every scenario (what ``make test``
runs); the defaults are the issue's figures (20 jobs / 5 kills, 10 queued, 60 s down,
200 jobs).

usage: python -m bench.chaos [--quick] [--scenarios kill,redis,receiver,sigterm,many,oom,spot,slow_receiver,...]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.harness import REPO, Fleet, place_clip
from ecg_audio.jobs import is_terminal
from worker.liveness import RESTORED_KEY


class Receiver:
    """Callback receiver that can be taken down and brought back on the same port."""

    def __init__(self, port: int = 0) -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.port = port
        self.server: ThreadingHTTPServer | None = None
        self.up()

    def up(self) -> None:
        rcv = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with rcv.lock:
                    rcv.events.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/cb"

    def finals(self, job_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if e.get("job_id") == job_id and e.get("status") in ("completed", "failed")]

    def final_event_ids(self) -> list[str]:
        with self.lock:
            return [e["event_id"] for e in self.events if e.get("status") in ("completed", "failed")]


def make_clips(var: Path, n: int, seconds: float) -> list[str]:
    """Short clips cut from pyannote's bundled sample call (and ../shared when present)."""
    import pyannote.audio

    sources = [Path(pyannote.audio.__file__).parent / "sample" / "sample.wav"]
    conv = REPO.parent / "shared" / "audio" / "conv_2spk_10min.wav"
    if conv.exists():
        sources.append(conv)
    clips = []
    uploads = var / "uploads"  # what the shim's /api/uploads writes; jobs name them upload://<id>
    uploads.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src = sources[i % len(sources)]
        start = 5.0 + 7.0 * (i // len(sources))
        clips.append(place_clip(src, uploads, start, seconds))
    return clips


# --- scenarios ---------------------------------------------------------------


def scenario_kill(var: Path, jobs: int, kills: int) -> dict[str, Any]:
    fleet = Fleet(var / "kill")
    rcv = Receiver()
    try:
        clips = make_clips(fleet.var, 4, 6.0)
        fleet.start_worker("w1")
        fleet.start_worker("w2")
        fleet.wait_workers(2)
        # undisturbed reference: one job per clip
        ref_ids = {c: fleet.submit(c) for c in clips}
        fleet.wait_all(list(ref_ids.values()), 600)
        reference = {c: fleet.signature(j) for c, j in ref_ids.items()}
        ids = {fleet.submit(clips[i % len(clips)], rcv.url()): clips[i % len(clips)] for i in range(jobs)}
        rng = random.Random(7)
        for _ in range(kills):
            time.sleep(rng.uniform(3, 10))
            victim = rng.choice(["w1", "w2"])
            fleet.kill_worker(victim)
            fleet.workers[victim].wait()
            fleet.start_worker(victim)
        status = fleet.wait_all(list(ids), 900)
        time.sleep(3)
        completed = [j for j, s in status.items() if s == "completed"]
        recomputed = sum(1 for j in ids for n in fleet.stage_runs(j).values() if n > 1)
        return {
            "jobs": jobs,
            "kills": kills,
            "completed": len(completed),
            "lost": jobs - len([s for s in status.values() if is_terminal(s)]),
            "failed": sum(1 for s in status.values() if s == "failed"),
            "results_equal": sum(1 for j, c in ids.items() if fleet.signature(j) == reference[c]),
            "one_final_callback": sum(1 for j in ids if len(rcv.finals(j)) == 1),
            "stages_recomputed": recomputed,
            # the dead-worker path was exercised: messages that peers gave back (worker.liveness)
            "restored_from_dead_workers": fleet.counter(RESTORED_KEY),
            "errors": sorted({(fleet.store.get(j).error_message or "") for j, s in status.items() if s == "failed"}),
        }
    finally:
        fleet.close()
        rcv.down()


def scenario_redis(var: Path, jobs: int) -> dict[str, Any]:
    fleet = Fleet(var / "redis")
    try:
        clips = make_clips(fleet.var, 2, 4.0)
        ids = [fleet.submit(clips[i % 2]) for i in range(jobs)]  # queued: no worker yet
        fleet.restart_redis()
        queued_after_restart = sum(1 for j in ids if fleet.store.get(j) is not None)
        fleet.start_worker("w1")
        fleet.start_worker("w2")
        status = fleet.wait_all(ids, 900)
        return {
            "jobs": jobs,
            "records_after_restart": queued_after_restart,
            "completed": sum(1 for s in status.values() if s == "completed"),
        }
    finally:
        fleet.close()


def scenario_receiver(var: Path, jobs: int, down_s: float) -> dict[str, Any]:
    fleet = Fleet(var / "receiver")
    rcv = Receiver()
    try:
        clips = make_clips(fleet.var, 2, 4.0)
        fleet.start_worker("w1")
        fleet.start_worker("w2")
        fleet.wait_workers(2)
        ids = [fleet.submit(clips[i % 2], rcv.url()) for i in range(jobs)]
        time.sleep(2)
        rcv.down()
        time.sleep(down_s)
        rcv.up()
        fleet.wait_all(ids, 900)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(rcv.finals(j) for j in ids):
            time.sleep(0.5)
        final_ids = rcv.final_event_ids()
        return {
            "jobs": jobs,
            "down_s": down_s,
            "jobs_with_final": sum(1 for j in ids if rcv.finals(j)),
            "final_duplicates": len(final_ids) - len(set(final_ids)),
            "pending_in_outbox": sum(int(fleet.store.r.llen(f"ecg:cb:q:{j}")) for j in ids),
        }
    finally:
        fleet.close()
        rcv.down()


def scenario_sigterm(var: Path) -> dict[str, Any]:
    fleet = Fleet(var / "sigterm")
    try:
        clips = make_clips(fleet.var, 1, 20.0)
        fleet.start_worker("w1")
        fleet.wait_workers(1)
        job = fleet.submit(clips[0])
        # wait until a model stage runs, then ask the worker to stop
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            rec = fleet.store.get(job)
            if rec and rec.progress >= 10:
                break
            time.sleep(0.2)
        fleet.kill_worker("w1", signal.SIGTERM)
        fleet.workers["w1"].wait(600)
        fleet.start_worker("w2")
        status = fleet.wait_all([job], 600)
        return {"completed": int(status[job] == "completed"), "lost": int(not is_terminal(status[job]))}
    finally:
        fleet.close()


def scenario_many(var: Path, jobs: int) -> dict[str, Any]:
    fleet = Fleet(var / "many")
    rcv = Receiver()
    try:
        clips = make_clips(fleet.var, 4, 3.0)
        fleet.start_worker("w1")
        fleet.start_worker("w2")
        fleet.wait_workers(2)
        t0 = time.monotonic()
        ids = [fleet.submit(clips[i % 4], rcv.url()) for i in range(jobs)]
        status = fleet.wait_all(ids, 3600)
        wall = time.monotonic() - t0
        time.sleep(3)
        finals = rcv.final_event_ids()
        return {
            "jobs": jobs,
            "completed": sum(1 for s in status.values() if s == "completed"),
            "duplicates": len(finals)
            - len(set(finals))
            + sum(1 for j in ids for n in fleet.stage_runs(j).values() if n > 1),
            "wall_s": round(wall, 1),
        }
    finally:
        fleet.close()
        rcv.down()


def scenario_oom(var: Path) -> dict[str, Any]:
    fleet = Fleet(var / "oom", extra_env={"ECG_FAULT_INJECTION": "cuda_oom:transcribe:2"})
    try:
        clips = make_clips(fleet.var, 1, 5.0)
        fleet.start_worker("w1")
        fleet.wait_workers(1)
        job = fleet.submit(clips[0], options={"batch_size": 8})
        status = fleet.wait_all([job], 600)
        md = ((fleet.store.get_result(job) or {}).get("result") or {}).get("metadata", {})
        rec = fleet.store.get(job)
        return {
            "completed": int(status[job] == "completed"),
            "notes": md.get("notes", []),
            "error": rec.error_message if rec else None,
        }
    finally:
        fleet.close()


def scenario_spot(var: Path, seconds: float, drain_s: float) -> dict[str, Any]:
    """A spot notice to the worker running a model stage; each worker reads its own fake IMDSv2.

    The liveness restore is pushed out of reach (``worker_dead_after_s`` 600 s), so the job
    can only finish in time if the interrupted worker hands its stage back itself.
    """
    from tests.fake_imds import FakeImds

    imds = {"w1": FakeImds("i-0chaos1"), "w2": FakeImds("i-0chaos2")}
    fleet = Fleet(
        var / "spot",
        extra_env={
            "ECG_INTERRUPTION_WATCH": "true",
            "ECG_INTERRUPTION_POLL_S": "1",
            "ECG_INTERRUPTION_DRAIN_S": str(drain_s),
            "ECG_WORKER_DEAD_AFTER_S": "600",
        },
    )
    try:
        clips = make_clips(fleet.var, 1, seconds)
        base_env = fleet.env
        for name, server in imds.items():
            fleet.env = {**base_env, "ECG_IMDS_ENDPOINT": server.endpoint}
            fleet.start_worker(name)
        fleet.env = base_env
        fleet.wait_workers(2)
        job = fleet.submit(clips[0])
        victim, stage = _running_model_stage(fleet, timeout=300)
        notice_at = time.monotonic()
        imds[victim].interrupt(in_s=120)
        try:
            fleet.workers[victim].wait(150)
            stopped_s: float | None = round(time.monotonic() - notice_at, 1)
        except subprocess.TimeoutExpired:
            stopped_s = None
        status = fleet.wait_all([job], 300)
        done_s = round(time.monotonic() - notice_at, 1)
        runs = fleet.stage_runs(job)
        return {
            "drain_s": drain_s,
            "interrupted_stage": stage,
            "worker_stopped_s": stopped_s,
            "worker_exit_code": fleet.workers[victim].poll(),
            "completed": int(status[job] == "completed"),
            "lost": int(status[job] not in ("completed", "failed")),
            "completed_after_notice_s": done_s,
            "runs": runs,
            "stages_recomputed_beyond_interrupted": sum(n - 1 for s, n in runs.items() if n > 1 and s != stage),
        }
    finally:
        fleet.close()
        for server in imds.values():
            server.close()


def _running_model_stage(fleet: Fleet, timeout: float) -> tuple[str, str]:
    """(worker name, stage) of the first model stage seen running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        active = fleet.app.control.inspect(timeout=1.0).active() or {}
        for hostname, tasks in active.items():
            for task in tasks:
                stage = str(task.get("name", "")).removeprefix("ecg.")
                if stage in ("diarize", "transcribe", "align"):
                    return hostname.split("@", 1)[0], stage
        time.sleep(0.2)
    raise RuntimeError(f"no model stage ran within {timeout} s")


# --- delivery scenarios (issue 17) -------------------------------------------------


class SlowReceiver:
    """A callback receiver that takes ``delay_s`` to answer each POST; records what arrived, in order."""

    def __init__(self, delay_s: float) -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        rcv = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(delay_s)
                with rcv.lock:
                    rcv.events.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        ThreadingHTTPServer.daemon_threads = True
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/cb"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _wait_for(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return True
        except Exception:  # Redis restarting
            pass
        time.sleep(0.3)
    return False


def scenario_slow_receiver(var: Path, jobs: int) -> dict[str, Any]:
    """Two dispatchers, each POST slower (1.5 s) than the dispatch lock's TTL (1 s): the lock is
    renewed while a POST runs and the outbox changed only by its owner."""
    import redis

    from ecg_audio.callbacks import CallbackOutbox, DeliveryPolicy, Dispatcher
    from ecg_audio.jobs import JobStatus

    fleet = Fleet(var / "slow_receiver")
    rcv = SlowReceiver(1.5)
    dispatchers: list[Any] = []
    try:
        ids = [f"slow-{uuid.uuid4().hex[:8]}" for _ in range(jobs)]
        for j in ids:
            req = {"job_id": j, "video_url": "https://example.com/a.wav", "callback_url": rcv.url()}
            assert fleet.store.create(j, req)
            for p, stage in ((10, "ingest"), (40, "diarize"), (60, "transcribe")):
                fleet.store.events.progress(j, progress=p, stage=stage, message=stage)
            fleet.store.events.finish(j, JobStatus.COMPLETED, stage="merge", message="Done", progress=100, result={})
        expected = {j: [f["event_id"] for _, f in fleet.store.r.xrange(f"ecg:job:{j}:events")] for j in ids}  # type: ignore[index, union-attr]
        policy = DeliveryPolicy(lock_ttl_s=1.0, deadline_s=30.0, backoff_base_s=0.1, backoff_max_s=1.0, max_attempts=50)
        t0 = time.monotonic()
        for _ in range(2):
            box = CallbackOutbox(redis.Redis.from_url(fleet.redis_url), policy)
            dispatchers.append(Dispatcher(box, interval_s=0.05).start())
        total = sum(len(v) for v in expected.values())
        _wait_for(lambda: len(rcv.events) >= total and not any(fleet.store.r.llen(f"ecg:cb:q:{j}") for j in ids), 600)
        wall = time.monotonic() - t0
        time.sleep(2.0)  # a late duplicate would land now
        got: dict[str, list[str]] = {j: [] for j in ids}
        with rcv.lock:
            for e in rcv.events:
                got[e["job_id"]].append(e["event_id"])
        delivered = sum(len(v) for v in got.values())
        unique = sum(len(set(v)) for v in got.values())
        finals = [e["event_id"] for e in rcv.events if e.get("status") in ("completed", "failed")]
        return {
            "jobs": jobs,
            "events": total,
            "delivered": delivered,
            "lost": total - unique,
            "duplicates": delivered - unique,
            "out_of_order_jobs": sum(1 for j in ids if [x for x in got[j] if x in expected[j]] != expected[j]),
            "final_duplicates": len(finals) - len(set(finals)),
            "wall_s": round(wall, 1),
        }
    finally:
        for d in dispatchers:
            d.stop()
        rcv.close()
        fleet.close()


def scenario_crash_before_final(var: Path, jobs: int) -> dict[str, Any]:
    """The merge process dies (SIGKILL) once per job between 'result stored' and 'job reported'."""
    fleet = Fleet(var / "crash_before_final", extra_env={"ECG_FAULT_INJECTION": "crash:before_final:1"})
    rcv = Receiver()
    try:
        clips = make_clips(fleet.var, 2, 4.0)
        fleet.start_worker("w1")
        fleet.wait_workers(1)
        ids = [fleet.submit(clips[i % 2], rcv.url()) for i in range(jobs)]
        status = fleet.wait_all(ids, 1200)
        _wait_for(lambda: all(rcv.finals(j) for j in ids), 120)
        time.sleep(2)
        finals = rcv.final_event_ids()
        return {
            "jobs": jobs,
            "completed": sum(1 for s in status.values() if s == "completed"),
            "crashes_injected": sum(fleet.counter(f"ecg:fault:{j}:before_final") >= 1 for j in ids),
            "one_final_each": sum(1 for j in ids if len(rcv.finals(j)) == 1),
            "finals_say_completed": sum(1 for j in ids if [e["status"] for e in rcv.finals(j)] == ["completed"]),
            "final_duplicates": len(finals) - len(set(finals)),
        }
    finally:
        fleet.close()
        rcv.down()


def scenario_poison(var: Path) -> dict[str, Any]:
    """diarize kills its own process on every delivery of one job: that job fails after
    ECG_MAX_STAGE_DELIVERIES (3), its final goes out, and the worker then serves the next job."""
    fleet = Fleet(
        var / "poison",
        extra_env={"ECG_FAULT_INJECTION": "crash:diarize:1000:poison-", "ECG_MAX_STAGE_DELIVERIES": "3"},
    )
    rcv = Receiver()
    try:
        clips = make_clips(fleet.var, 1, 4.0)
        fleet.start_worker("w1")
        fleet.wait_workers(1)
        poison = fleet.submit_as(f"poison-{uuid.uuid4().hex[:8]}", clips[0], rcv.url())
        status = fleet.wait_all([poison], 1500)
        nxt = fleet.submit(clips[0], rcv.url())
        status.update(fleet.wait_all([nxt], 900))
        _wait_for(lambda: rcv.finals(poison) and rcv.finals(nxt), 60)
        rec = fleet.store.get(poison)
        finals = rcv.finals(poison)
        return {
            "poison_status": status[poison],
            "error_code": rec.error_code if rec else None,
            "deliveries_killed": fleet.counter(f"ecg:fault:{poison}:diarize"),
            "final_sent": int(len(finals) == 1 and finals[0].get("error_code") == "STAGE_CRASHED"),
            "dead_letter_listed": int(poison in fleet.store.failed_ids(1000)),
            "next_job_completed": int(status[nxt] == "completed"),
            "worker_alive": int(fleet.workers["w1"].poll() is None),
        }
    finally:
        fleet.close()
        rcv.down()


def scenario_restart_in_place(var: Path) -> dict[str, Any]:
    """A worker SIGKILLed mid-stage and started again at once under the same name on the same host
    (what `restart: unless-stopped` does): the new life restores the old life's message."""
    fleet = Fleet(var / "restart_in_place")
    try:
        clips = make_clips(fleet.var, 1, 20.0)
        fleet.start_worker("w1")
        fleet.wait_workers(1)
        job = fleet.submit(clips[0])
        _wait_for(lambda: (fleet.store.get(job) or SimpleNamespace(progress=0)).progress >= 15, 600)
        fleet.kill_worker("w1")
        fleet.workers["w1"].wait()
        t_kill = time.monotonic()
        fleet.start_worker("w1")
        restored = _wait_for(lambda: fleet.counter(RESTORED_KEY) > 0, 600)
        seconds = time.monotonic() - t_kill
        status = fleet.wait_all([job], 900)
        return {
            "restored": fleet.counter(RESTORED_KEY),
            "seconds_to_restore": round(seconds, 1) if restored else None,
            "completed": int(status[job] == "completed"),
            "stages_recomputed": sum(1 for n in fleet.stage_runs(job).values() if n > 1),
        }
    finally:
        fleet.close()


def scenario_redis_blip(var: Path, down_s: float) -> dict[str, Any]:
    """Redis stopped for ``down_s`` while two jobs' stages run: every job continues (or is redelivered)
    and completes; stall = time from Redis's return to the job's next progress (or its end)."""
    from worker.liveness import ORPHANS_KEY

    fleet = Fleet(var / "redis_blip")
    try:
        clips = make_clips(fleet.var, 2, 20.0)
        fleet.start_worker("w1")
        fleet.start_worker("w2")
        fleet.wait_workers(2)
        ids = [fleet.submit(clips[i]) for i in range(2)]

        def running() -> bool:
            recs = [fleet.store.get(j) for j in ids]
            return all(r is not None and r.status == "processing" and r.progress >= 15 for r in recs)

        _wait_for(running, 600)
        before = {j: (fleet.store.get(j) or SimpleNamespace(progress=-1, status="")) for j in ids}
        fleet.blip_redis(down_s)
        t_back = time.monotonic()
        stall: dict[str, float | None] = {j: None for j in ids}
        deadline = t_back + 900
        while time.monotonic() < deadline and any(v is None for v in stall.values()):
            for j in ids:
                if stall[j] is not None:
                    continue
                try:
                    rec = fleet.store.get(j)
                except Exception:
                    continue
                if rec is not None and (rec.progress > before[j].progress or rec.status in ("completed", "failed")):
                    stall[j] = round(time.monotonic() - t_back, 1)
            time.sleep(0.3)
        status = fleet.wait_all(ids, 900)
        stalls = [v for v in stall.values() if v is not None]
        return {
            "jobs": len(ids),
            "down_s": down_s,
            "completed": sum(1 for s in status.values() if s == "completed"),
            "max_stall_s": max(stalls) if len(stalls) == len(ids) else None,
            "stalled_over_60s": sum(1 for v in stall.values() if v is None or v > 60),
            "orphans_restored": fleet.counter(ORPHANS_KEY),
        }
    finally:
        fleet.close()


def scenario_cancel_during_merge(var: Path) -> dict[str, Any]:
    """A DELETE (JobStore.mark_failed CANCELLED, what the shim does) while merge is between storing
    the result and reporting the job (held there 8 s by fault injection)."""
    fleet = Fleet(var / "cancel_during_merge", extra_env={"ECG_FAULT_INJECTION": "pause:before_final:8"})
    rcv = Receiver()
    try:
        clips = make_clips(fleet.var, 1, 4.0)
        fleet.start_worker("w1")
        fleet.wait_workers(1)
        job = fleet.submit(clips[0], rcv.url())
        in_merge = _wait_for(lambda: fleet.store.get_result(job) is not None, 900)
        cancelled = fleet.store.mark_failed(job, "CANCELLED", "cancelled by request", "merge")
        status = fleet.wait_all([job], 300)
        _wait_for(lambda: rcv.finals(job), 60)
        time.sleep(10)  # the paused merge resumes meanwhile: a second final would land now
        rec = fleet.store.get(job)
        finals = rcv.finals(job)
        agree = (
            len(finals) == 1
            and rec is not None
            and finals[0]["status"] == rec.status
            and finals[0].get("error_code") == rec.error_code
        )
        return {
            "cancelled_in_merge": int(in_merge and cancelled),
            "record": f"{status[job]}/{rec.error_code if rec else None}",
            "finals": len(finals),
            "final": f"{finals[0]['status']}/{finals[0].get('error_code')}" if finals else None,
            "agree": int(agree),
        }
    finally:
        fleet.close()
        rcv.down()


NEW_SCENARIOS = (
    "slow_receiver",
    "crash_before_final",
    "poison",
    "restart_in_place",
    "redis_blip",
    "cancel_during_merge",
)


def run_new_scenarios(wanted: list[str], var: Path, quick: bool, out: dict[str, Any]) -> None:
    if "slow_receiver" in wanted:
        out["slow_receiver"] = scenario_slow_receiver(var, 3 if quick else 10)
    if "crash_before_final" in wanted:
        out["crash_before_final"] = scenario_crash_before_final(var, 2 if quick else 5)
    if "poison" in wanted:
        out["poison"] = scenario_poison(var)
    if "restart_in_place" in wanted:
        out["restart_in_place"] = scenario_restart_in_place(var)
    if "redis_blip" in wanted:
        out["redis_blip"] = scenario_redis_blip(var, 10.0)
    if "cancel_during_merge" in wanted:
        out["cancel_during_merge"] = scenario_cancel_during_merge(var)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts, for make test")
    every = ("kill", "redis", "receiver", "sigterm", "many", "oom", "spot", *NEW_SCENARIOS)
    ap.add_argument("--scenarios", default=",".join(every))
    ap.add_argument("--keep", help="keep logs and workspaces in this directory")
    a = ap.parse_args()
    wanted = a.scenarios.split(",")
    out: dict[str, Any] = {"quick": a.quick}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ecg-chaos-") as tmp:
        var = Path(a.keep or tmp)
        if "kill" in wanted:
            out["kill"] = scenario_kill(var, 6 if a.quick else 20, 2 if a.quick else 5)
        if "redis" in wanted:
            out["redis"] = scenario_redis(var, 4 if a.quick else 10)
        if "receiver" in wanted:
            out["receiver"] = scenario_receiver(var, 3 if a.quick else 10, 8.0 if a.quick else 60.0)
        if "sigterm" in wanted:
            out["sigterm"] = scenario_sigterm(var)
        if "many" in wanted:
            out["many"] = scenario_many(var, 12 if a.quick else 200)
        if "oom" in wanted:
            out["oom"] = scenario_oom(var)
        if "spot" in wanted:
            # quick: the stage is handed back at once (drain 0 s); full: it may finish first (90 s)
            out["spot"] = scenario_spot(var, 20.0 if a.quick else 60.0, 0.0 if a.quick else 90.0)
        run_new_scenarios(wanted, var, a.quick, out)
    out["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
