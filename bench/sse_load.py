#!/usr/bin/env python3
"""Many live event streams on one shim process: how late does an event reach its client?

Starts its own Redis and ONE shim process (uvicorn, one worker process), creates ``--jobs`` job
records, and opens ``--streams`` concurrent ``GET /jobs/{id}/events`` streams (Server-Sent
Events), spread evenly over the jobs, from this process (asyncio + httpx). Once every stream is
open, it appends ``--events`` events to every job's event log (``ecg_audio.event_log.append``,
as a worker does), one round every ``--interval`` seconds (a round: one event for every job, in
one Redis pipeline, a burst of ``--jobs`` events at once), the last one each job's final event.

Each event carries the time it was appended; each client notes when it read it. The delay is
read time minus append time (same machine, same clock). Every stream must get every event of its
job once, in order, ending with the final event (``missing``, ``duplicates``, ``out_of_order``
must be 0), and its stream must then end.

Acceptance (issue 18): 200 concurrent streams on one shim process, p99 event delay <= 1 s.

usage: python -m bench.sse_load [--streams 200] [--jobs 200] [--events 10] [--interval 0.5]
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

from ecg_audio import event_log
from ecg_audio.jobs import JobStore
from ops.stack import free_port, start_redis

REPO = Path(__file__).resolve().parents[1]
API_KEY = "sse-bench-key-0123456789"
P99_LIMIT_MS = 1000.0


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


@dataclass
class StreamLog:
    job_id: str
    ids: list[str] = field(default_factory=list)
    delays_ms: list[float] = field(default_factory=list)
    ended: bool = False
    error: str | None = None


async def read_stream(client: httpx.AsyncClient, log: StreamLog, opened: asyncio.Event, counter: list[int]) -> None:
    try:
        async with client.stream("GET", f"/jobs/{log.job_id}/events") as resp:
            resp.raise_for_status()
            counter[0] += 1
            if counter[0] == counter[1]:
                opened.set()
            data = ""
            async for line in resp.aiter_lines():
                if line.startswith("id: "):
                    log.ids.append(line[4:])
                elif line.startswith("data: "):
                    data = line[6:]
                elif line == "" and data:
                    now = time.time()
                    log.delays_ms.append((now - json.loads(data)["bench_appended_at"]) * 1000)
                    data = ""
            log.ended = True
    except Exception as e:  # reported in the JSON line, not raised: one bad stream must not hide the others
        log.error = f"{type(e).__name__}: {e}"


async def write_events(redis_url: str, jobs: list[str], events: int, interval: float, ttl_s: int) -> float:
    """Append ``events`` events to every job, one round per ``interval``; returns the seconds it took."""
    import redis.asyncio

    r = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    t0 = time.monotonic()
    try:
        for n in range(events):
            final = n == events - 1
            pipe = r.pipeline(transaction=False)
            for job in jobs:
                payload = {
                    "job_id": job,
                    "status": "completed" if final else "processing",
                    "progress": 100 if final else int(100 * (n + 1) / events),
                    "message": "Done" if final else f"step {n + 1}",
                    "bench_appended_at": time.time(),
                }
                event_log.append(pipe, job, event_log.new_event_id(job, final=final), payload, ttl_s=ttl_s)
            await pipe.execute()
            await asyncio.sleep(interval)
    finally:
        await r.aclose()
    return time.monotonic() - t0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def run(args: argparse.Namespace, base_url: str, redis_url: str, jobs: list[str]) -> dict[str, Any]:
    logs = [StreamLog(jobs[i % len(jobs)]) for i in range(args.streams)]
    opened = asyncio.Event()
    counter = [0, args.streams]
    limits = httpx.Limits(max_connections=args.streams + 10, max_keepalive_connections=args.streams + 10)
    timeout = httpx.Timeout(connect=30, read=120, write=30, pool=60)
    async with httpx.AsyncClient(
        base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, limits=limits, timeout=timeout
    ) as client:
        t0 = time.monotonic()
        readers = [asyncio.create_task(read_stream(client, log, opened, counter)) for log in logs]
        try:
            await asyncio.wait_for(opened.wait(), timeout=120)
        except TimeoutError:
            pass
        connect_s = time.monotonic() - t0
        write_s = await write_events(redis_url, jobs, args.events, args.interval, 3600)
        await asyncio.wait_for(asyncio.gather(*readers), timeout=120 + args.events * args.interval)
    delays = [d for log in logs for d in log.delays_ms]
    expected = args.streams * args.events
    duplicates = sum(len(log.ids) - len(set(log.ids)) for log in logs)
    out_of_order = 0
    missing = 0
    for log in logs:
        want = [e.event_id for e in event_log.read_all(redis.Redis.from_url(redis_url, decode_responses=True),
                                                        log.job_id)]
        missing += len(set(want) - set(log.ids))
        if [i for i in log.ids if i in want] != want[: len([i for i in log.ids if i in want])]:
            out_of_order += 1
    return {
        "streams_opened": counter[0],
        "connect_all_s": round(connect_s, 2),
        "events_expected": expected,
        "events_received": len(delays),
        "missing": missing,
        "duplicates": duplicates,
        "out_of_order_streams": out_of_order,
        "streams_ended_after_final": sum(1 for log in logs if log.ended and log.ids and log.ids[-1].endswith(":final")),
        "stream_errors": sorted({log.error for log in logs if log.error})[:3],
        "write_s": round(write_s, 2),
        "delay_ms_p50": round(percentile(delays, 50), 1),
        "delay_ms_p90": round(percentile(delays, 90), 1),
        "delay_ms_p99": round(percentile(delays, 99), 1),
        "delay_ms_max": round(max(delays), 1) if delays else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=200, help="streams are spread evenly over this many jobs")
    ap.add_argument("--events", type=int, default=10, help="events per job, the last one final")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between rounds")
    ap.add_argument("--keepalive", type=float, default=15.0, help="ECG_SSE_KEEPALIVE_S of the shim")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="sse-bench-") as tmp:
        redis_port, shim_port = free_port(), free_port()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        redis_proc = start_redis(Path(tmp) / "redis", redis_port, appendonly=False)
        env = dict(os.environ)
        env.update(
            {
                "ECG_REDIS_URL": redis_url,
                "ECG_API_KEYS": json.dumps([API_KEY]),
                "ECG_VAR_DIR": tmp,
                "ECG_SSE_KEEPALIVE_S": str(args.keepalive),
                "ECG_LOG_LEVEL": "WARNING",
                "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
            }
        )
        shim = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api_shim.app:app", "--host", "127.0.0.1", "--port", str(shim_port),
             "--workers", "1", "--log-level", "warning", "--no-access-log"],
            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(Path(tmp) / "shim.log", "wb"),  # noqa: SIM115
        )
        base_url = f"http://127.0.0.1:{shim_port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(base_url + "/health", timeout=2)
                    break
                except httpx.HTTPError:
                    if shim.poll() is not None or time.monotonic() > deadline:
                        eprint((Path(tmp) / "shim.log").read_text()[-3000:])
                        return 2
                    time.sleep(0.3)
            store = JobStore.from_url(redis_url, 3600)
            run_id = uuid.uuid4().hex[:6]
            jobs = [f"sse-{run_id}-{i}" for i in range(args.jobs)]
            for job in jobs:
                store.create(job, {"job_id": job, "video_url": "s3://bench/none.wav"})
            proc = psutil.Process(shim.pid)
            cpu0 = sum(proc.cpu_times()[:2])
            t0 = time.monotonic()
            report = asyncio.run(run(args, base_url, redis_url, jobs))
            wall = time.monotonic() - t0
            cpu = sum(proc.cpu_times()[:2]) - cpu0
            rss_mb = proc.memory_info().rss / 2**20
            if report["stream_errors"]:
                eprint((Path(tmp) / "shim.log").read_text(errors="replace")[-4000:])
        finally:
            shim.terminate()
            shim.wait(20)
            redis_proc.terminate()
            redis_proc.wait(10)
    ok = (
        report["streams_opened"] == args.streams
        and report["events_received"] == report["events_expected"]
        and report["missing"] == report["duplicates"] == report["out_of_order_streams"] == 0
        and report["delay_ms_p99"] <= P99_LIMIT_MS
    )
    line = {
        "bench": "sse_load",
        "streams": args.streams,
        "jobs": args.jobs,
        "events_per_job": args.events,
        "interval_s": args.interval,
        "shim_processes": 1,
        **report,
        "shim_cpu_s": round(cpu, 2),
        "shim_cpu_share": round(cpu / wall, 2) if wall else None,
        "shim_rss_mb": round(rss_mb, 1),
        "cores": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "p99_limit_ms": P99_LIMIT_MS,
        "ok": ok,
    }
    print(json.dumps(line), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
