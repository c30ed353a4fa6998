#!/usr/bin/env python3
"""Chaos bench, delivery faults: every event delivered once, in order, whatever breaks.

Real processes as in ``bench.chaos`` (Redis, Celery workers with the real models, a callback
receiver), disturbed:

1. ``slow_receiver``:       two dispatchers, a receiver slower per POST than the dispatch lock's
                            TTL, 10 jobs' events: all delivered, in order, none twice.
2. ``crash_before_final``:  the merge process killed after the result is stored, before the job
                            is reported: one final callback per job all the same.
3. ``poison``:              a stage that kills its own process on every delivery: the job fails
                            (STAGE_CRASHED) after N deliveries, its final goes out, the worker
                            serves the next job.
4. ``restart_in_place``:    a worker killed mid-job and restarted under the same name on the same
                            host: its previous life's message restored within 60 s.
5. ``redis_blip``:          Redis down 10 s while 2 stages run: all jobs complete, none stalls
                            more than 60 s.
6. ``cancel_during_merge``: a DELETE while merge runs: record and final callback agree.
7. ``slowloris_tenant``:    tenant A's receiver trickles a byte every 5 s; tenant B's events all
                            arrive, in order, p99 delay ≤ 2 s (two dispatchers, default settings).

Prints one JSON line of counts; ``--quick`` shrinks the scenarios (what ``make test`` runs).

usage: python -m bench.chaos_delivery [--quick] [--scenarios slow_receiver,poison,...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.harness import Fleet, Receiver, make_clips, wait_for
from worker.liveness import RESTORED_KEY

# --- delivery scenarios (issue 17) -------------------------------------------------


def scenario_slow_receiver(var: Path, jobs: int) -> dict[str, Any]:
    """Two dispatchers, each POST slower (1.5 s) than the dispatch lock's TTL (1 s): the lock is
    renewed while a POST runs and the outbox changed only by its owner."""
    import redis

    from ecg_audio.callbacks import CallbackOutbox, DeliveryPolicy, Dispatcher
    from ecg_audio.jobs import JobStatus

    fleet = Fleet(var / "slow_receiver")
    rcv = Receiver(delay_s=1.5)
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
        policy = DeliveryPolicy(lock_ttl_s=1.0)  # the default schedule: nothing here fails
        t0 = time.monotonic()
        for _ in range(2):
            box = CallbackOutbox(redis.Redis.from_url(fleet.redis_url), policy)
            dispatchers.append(Dispatcher(box, interval_s=0.05).start())
        total = sum(len(v) for v in expected.values())
        wait_for(lambda: len(rcv.events) >= total and not any(fleet.store.r.llen(f"ecg:cb:q:{j}") for j in ids), 600)
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
        rcv.down()
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
        wait_for(lambda: all(rcv.finals(j) for j in ids), 120)
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
        wait_for(lambda: rcv.finals(poison) and rcv.finals(nxt), 60)
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
        wait_for(lambda: (fleet.store.get(job) or SimpleNamespace(progress=0)).progress >= 15, 600)
        fleet.kill_worker("w1")
        fleet.workers["w1"].wait()
        t_kill = time.monotonic()
        fleet.start_worker("w1")
        restored = wait_for(lambda: fleet.counter(RESTORED_KEY) > 0, 600)
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

        wait_for(running, 600)
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
        in_merge = wait_for(lambda: fleet.store.get_result(job) is not None, 900)
        cancelled = fleet.store.mark_failed(job, "CANCELLED", "cancelled by request", "merge")
        status = fleet.wait_all([job], 300)
        wait_for(lambda: rcv.finals(job), 60)
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


class Trickler:
    """A receiver that accepts every connection and answers one byte every ``every_s`` (a slowloris
    backend: an answer takes minutes, and every read arrives well within any per-read timeout)."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.connections = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/cb"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                conn.sendall(bytes([byte]))
                time.sleep(self.every_s)

    def close(self) -> None:
        self.sock.close()


def scenario_slowloris_tenant(var: Path, jobs: int, run_s: float) -> dict[str, Any]:
    """Tenant A's ``jobs`` jobs call a receiver that trickles a byte every 5 s; tenant B's ``jobs`` jobs
    call a healthy one. Both emit their events through the one event builder over ``run_s``; two
    dispatchers with the DEFAULT delivery settings (as the shim and a worker run them) deliver. B's
    events must all arrive, in order, each within 2 s (p99) of being emitted."""
    from ecg_audio.callbacks import Dispatcher
    from ecg_audio.jobs import JobStatus
    from ecg_audio.settings import Settings
    from media_io.policy import make_outbox

    fleet = Fleet(var / "slowloris_tenant")
    slow, rcv = Trickler(5.0), Receiver()
    arrived: dict[str, float] = {}
    settings = Settings(
        redis_url=fleet.redis_url, url_allowlist=["127.0.0.1"], callback_signing_key="chaos-root-key-0123456789"
    )
    dispatchers = [Dispatcher(make_outbox(settings)).start() for _ in range(2)]
    try:
        a_ids = [f"tenA-{uuid.uuid4().hex[:8]}" for _ in range(jobs)]
        b_ids = [f"tenB-{uuid.uuid4().hex[:8]}" for _ in range(jobs)]
        for j in a_ids + b_ids:
            url = slow.url() if j in a_ids else rcv.url()
            assert fleet.store.create(j, {"job_id": j, "video_url": "https://example.com/a.wav", "callback_url": url})
        milestones = ((10, "ingest"), (25, "diarize"), (40, "diarize"), (60, "transcribe"), (80, "features"))
        steps = len(milestones) + 1
        for i in range(steps):
            for j in a_ids + b_ids:  # A's first: its events are due before B's every time
                if i < len(milestones):
                    p, stage = milestones[i]
                    fleet.store.events.progress(j, progress=p, stage=stage, message=stage)
                else:
                    fleet.store.events.finish(j, JobStatus.COMPLETED, stage="merge", message="Done", progress=100)
            time.sleep(run_s / steps)
        logs = {j: list(fleet.store.r.xrange(f"ecg:job:{j}:events")) for j in b_ids}  # type: ignore[arg-type]
        expected = {j: [str(f["event_id"]) for _, f in logs[j]] for j in b_ids}  # type: ignore[index]
        # when each event was emitted: its stream entry id is the Redis clock in ms
        emitted = {str(f["event_id"]): int(str(sid).split("-")[0]) / 1000.0 for j in b_ids for sid, f in logs[j]}  # type: ignore[index]
        total = sum(len(v) for v in expected.values())
        wait_for(lambda: len(rcv.events) >= total, 300)
        time.sleep(2.0)  # a late duplicate would land now
        got: dict[str, list[str]] = {j: [] for j in b_ids}
        with rcv.lock:
            for e in rcv.events:
                got[e["job_id"]].append(e["event_id"])
            arrived = dict(rcv.arrived)
        delays = sorted(arrived[i] - emitted[i] for i in emitted if i in arrived)
        delivered = sum(len(v) for v in got.values())
        unique = sum(len(set(v)) for v in got.values())
        return {
            "jobs_per_tenant": jobs,
            "trickle_every_s": slow.every_s,
            "b_events": total,
            "b_delivered": delivered,
            "b_lost": total - unique,
            "b_duplicates": delivered - unique,
            "b_out_of_order_jobs": sum(1 for j in b_ids if got[j] != expected[j]),
            "b_p50_delay_s": round(delays[len(delays) // 2], 3) if delays else None,
            "b_p99_delay_s": round(delays[min(len(delays) - 1, int(len(delays) * 0.99))], 3) if delays else None,
            "b_max_delay_s": round(delays[-1], 3) if delays else None,
            "a_connections": slow.connections,
            # A's events are not lost: they wait in its outbox for the schedule's next attempt
            "a_events_waiting": sum(int(fleet.store.r.llen(f"ecg:cb:q:{j}")) for j in a_ids),  # type: ignore[arg-type]
            "a_events_dead": sum(int(fleet.store.r.llen(f"ecg:cb:dead:{j}")) for j in a_ids),  # type: ignore[arg-type]
        }
    finally:
        for d in dispatchers:
            d.stop()
        slow.close()
        rcv.down()
        fleet.close()


SCENARIOS = (
    "slow_receiver",
    "crash_before_final",
    "poison",
    "restart_in_place",
    "redis_blip",
    "cancel_during_merge",
    "slowloris_tenant",
)


def run_scenarios(wanted: list[str], var: Path, quick: bool, out: dict[str, Any]) -> None:
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
    if "slowloris_tenant" in wanted:
        out["slowloris_tenant"] = scenario_slowloris_tenant(var, 6 if quick else 20, 30.0 if quick else 120.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts, for make test")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--keep", help="keep logs and workspaces in this directory")
    a = ap.parse_args()
    out: dict[str, Any] = {"quick": a.quick}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ecg-chaos-delivery-") as tmp:
        run_scenarios(a.scenarios.split(","), Path(a.keep or tmp), a.quick, out)
    out["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
