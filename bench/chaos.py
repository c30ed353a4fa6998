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
8. ``redis_outage_long``:  Redis away 90 s (quick: 45 s) while two workers run stages, past the
                          liveness window and the lease TTL, the worker running a model stage
                          paused until its peer restored its message: every job completes once, no
                          stage's successor published twice, nothing stuck.

The delivery scenarios (slow receiver, crash before the final, poison message, restart in
place, Redis blip, cancel during merge) are ``bench/chaos_delivery.py``.

Prints one JSON line of counts. ``--quick`` shrinks every scenario (what ``make test``
runs); the defaults are the issue's figures (20 jobs / 5 kills, 10 queued, 60 s down,
200 jobs).

usage: python -m bench.chaos [--quick] [--scenarios kill,redis,receiver,sigterm,many,oom,spot]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import Fleet, Receiver, make_clips, wait_for
from ecg_audio.jobs import is_terminal
from worker.liveness import RESTORED_KEY

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
            time.sleep(rng.uniform(1, 4))
            # the worker running a model stage, so that the kill takes a message with it and the
            # dead-worker restore (worker.liveness) is what brings it back (a random victim was
            # often idle: nothing to restore)
            try:
                victim = _running_model_stage(fleet, 20.0)[0]
            except RuntimeError:
                victim = rng.choice(["w1", "w2"])
            fleet.kill_worker(victim)
            fleet.workers[victim].wait()
            fleet.start_worker(victim)
        status = fleet.wait_all(list(ids), 900)
        # a killed worker may have held a job's callback dispatch lock: it lapses after its TTL (60 s)
        wait_for(lambda: all(rcv.finals(j) for j in ids), 180)
        time.sleep(3)  # a duplicate final would have arrived by now
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
        # the default schedule: an event refused twice while the receiver was down waits ~5 min more
        deadline = time.monotonic() + 5 + 300 * 1.1 + 60
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
    from bench.fake_imds import FakeImds

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


def scenario_redis_outage_long(var: Path, jobs: int, down_s: float) -> dict[str, Any]:
    """Redis away longer than the liveness window and the stage lease's TTL while two workers run
    stages: on its return every heartbeat and lease has expired, so a worker's reaper restores the
    other's message and a second copy of a running stage starts beside the first. Every job must
    complete once, no stage's successor be published twice, and nothing be left stuck.

    Which worker reaps first is a race; so that a restore happens on every run, the worker running a
    model stage is paused (SIGSTOP) through the outage and until its peer has restored its message,
    then resumed: its stage goes on under a lease that another copy holds now."""
    from ecg_audio.event_log import is_final
    from ecg_audio.event_log import key as event_log_key
    from ecg_audio.queues import queue_depth
    from worker.liveness import ORPHANS_KEY, UNACKED

    fleet = Fleet(var / "redis_outage_long")
    try:
        clips = make_clips(fleet.var, 2, 20.0)
        fleet.start_worker("w1")
        fleet.start_worker("w2")
        fleet.wait_workers(2)
        ids = [fleet.submit(clips[i % 2]) for i in range(jobs)]

        def two_running() -> bool:
            recs = [fleet.store.get(j) for j in ids]
            return sum(1 for r in recs if r is not None and r.status == "processing" and r.progress >= 15) >= 2

        wait_for(two_running, 600)
        paused, _ = _running_model_stage(fleet, 300)
        fleet.kill_worker(paused, signal.SIGSTOP)
        try:
            fleet.blip_redis(down_s)
            back = time.monotonic()
            wait_for(lambda: _restored(fleet) > 0, 120)
        finally:
            fleet.kill_worker(paused, signal.SIGCONT)
        status = fleet.wait_all(ids, 1200)
        done_s = round(time.monotonic() - back, 1)

        def drained() -> bool:  # every message acknowledged, none waiting
            return sum(queue_depth(fleet.store.r).values()) == 0 and int(fleet.store.r.hlen(UNACKED)) == 0

        wait_for(drained, 120)
        finals = {j: [e for _, e in fleet.store.r.xrange(event_log_key(j)) if is_final(e["event_id"])] for j in ids}
        publishes = {j: _counts(fleet, j, "publishes:") for j in ids}
        return {
            "jobs": jobs,
            "down_s": down_s,
            "completed": sum(1 for s in status.values() if s == "completed"),
            "one_final_each": sum(1 for j in ids if len(finals[j]) == 1),
            "duplicate_publishes": sum(max(0, n - 1) for p in publishes.values() for n in p.values()),
            "stages_published": sum(len(p) for p in publishes.values()),
            "stuck": sum(1 for s in status.values() if s not in ("completed", "failed"))
            + sum(queue_depth(fleet.store.r).values())
            + int(fleet.store.r.hlen(UNACKED)),
            "paused_worker": paused,
            "restored_from_dead_workers": fleet.counter(RESTORED_KEY),
            "orphans_restored": fleet.counter(ORPHANS_KEY),
            "completed_after_return_s": done_s,
        }
    finally:
        fleet.close()


def _restored(fleet: Fleet) -> int:
    try:
        return fleet.counter(RESTORED_KEY)
    except Exception:  # Redis still starting
        return 0


def _counts(fleet: Fleet, job_id: str, prefix: str) -> dict[str, int]:
    h = fleet.store.r.hgetall(f"ecg:job:{job_id}")
    return {k.removeprefix(prefix): int(v) for k, v in h.items() if k.startswith(prefix)}


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts, for make test")
    every = ("kill", "redis", "receiver", "sigterm", "many", "oom", "spot", "redis_outage_long")
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
            # quick: down less than the first retry's wait (5 s), so each refused event's retry lands after it
            out["receiver"] = scenario_receiver(var, 3 if a.quick else 10, 3.0 if a.quick else 60.0)
        if "sigterm" in wanted:
            out["sigterm"] = scenario_sigterm(var)
        if "many" in wanted:
            out["many"] = scenario_many(var, 12 if a.quick else 200)
        if "oom" in wanted:
            out["oom"] = scenario_oom(var)
        if "spot" in wanted:
            # quick: the stage is handed back at once (drain 0 s); full: it may finish first (90 s)
            out["spot"] = scenario_spot(var, 20.0 if a.quick else 60.0, 0.0 if a.quick else 90.0)
        if "redis_outage_long" in wanted:
            # longer than the liveness window (10 s here) and the lease TTL (30 s) either way
            out["redis_outage_long"] = scenario_redis_outage_long(var, 2 if a.quick else 4, 45.0 if a.quick else 90.0)
    out["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
