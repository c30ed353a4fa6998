#!/usr/bin/env python3
"""Polling queued jobs must not slow submission: issue 23's queue-position acceptance.

Starts Redis and one shim process (no worker: jobs just queue), queues ``--queued`` jobs (10,000),
then measures submission latency twice, one POST after another at ``--submit-rate`` per second:
idle, and while ``--poll-rate`` (200) ``GET /jobs/{id}`` per second ask for the queue position of
the jobs at the back of the queue (the most expensive position to find by scanning). Prints the
p50/p99 of both runs and ``p99_ratio`` (polled / idle; the acceptance is ≤ 1.10) with the CPU.

usage: python -m bench.queue_poll [--queued 10000] [--poll-rate 200] [--submissions 400]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

from bench.harness import API_KEY, BenchFleet, emit, exit_cleanly_on_sigterm, loadavg

PROCESS = "/api/upload-video/process-video"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _body(job_id: str) -> dict[str, str]:
    return {"job_id": job_id, "video_url": "upload://" + uuid.uuid4().hex}


def _submissions(client: httpx.Client, n: int, rate: float, tag: str) -> list[float]:
    """Latency (ms) of ``n`` POSTs sent at ``rate`` per second, one after another."""
    out: list[float] = []
    start = time.perf_counter()
    for i in range(n):
        due = start + i / rate
        time.sleep(max(0.0, due - time.perf_counter()))
        t0 = time.perf_counter()
        r = client.post(PROCESS, json=_body(f"{tag}-{i}-{uuid.uuid4().hex[:6]}"))
        out.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 202:
            raise RuntimeError(f"submission answered {r.status_code}: {r.text[:200]}")
    return out


def _poll(url: str, ids: list[str], rate: float, stop: threading.Event, counts: list[int]) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as client:
        start, i = time.perf_counter(), 0
        while not stop.is_set():
            due = start + i / rate
            time.sleep(max(0.0, due - time.perf_counter()))
            r = client.get(f"/jobs/{ids[i % len(ids)]}")
            if r.status_code == 200 and r.json().get("queue_position") is not None:
                counts[0] += 1
            i += 1


def _pct(values: list[float], q: float) -> float:
    return round(statistics.quantiles(values, n=100)[int(q) - 1], 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queued", type=int, default=10_000)
    ap.add_argument("--poll-rate", type=float, default=200.0)
    ap.add_argument("--submissions", type=int, default=400)
    ap.add_argument("--submit-rate", type=float, default=20.0)
    a = ap.parse_args()
    exit_cleanly_on_sigterm()
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="ecg-bench-queue-") as tmp:
        fleet = BenchFleet(Path(tmp) / "fleet", extra_env={"ECG_LOG_LEVEL": "WARNING"})
        try:
            url = fleet.start_shim(1)
            from ecg_audio.chain import ChainMessages

            messages = ChainMessages()
            queued = [f"queued-{i}" for i in range(a.queued)]
            for job_id in queued:
                fleet.store.create_or_get(job_id, _body(job_id), message=messages.build(job_id))
            back = queued[-50:]  # the back of the queue: a scan would read the whole list for these
            client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
            first = client.get(f"/jobs/{back[-1]}").json()["queue_position"]
            _submissions(client, 50, a.submit_rate, "warm")
            idle = _submissions(client, a.submissions, a.submit_rate, "idle")
            stop, answered = threading.Event(), [0]
            poller = threading.Thread(target=_poll, args=(url, back, a.poll_rate, stop, answered), daemon=True)
            t0 = time.perf_counter()
            poller.start()
            polled = _submissions(client, a.submissions, a.submit_rate, "polled")
            stop.set()
            poller.join(30)
            poll_rate = answered[0] / (time.perf_counter() - t0)
        finally:
            fleet.close()
    emit(
        {
            "bench": "queue_poll",
            "cpu": _cpu_name(),
            "queued": a.queued,
            "position_of_last": first,
            "polls_per_s_achieved": round(poll_rate, 1),
            "idle_p50_ms": _pct(idle, 50),
            "idle_p99_ms": _pct(idle, 99),
            "polled_p50_ms": _pct(polled, 50),
            "polled_p99_ms": _pct(polled, 99),
            "p99_ratio": round(_pct(polled, 99) / _pct(idle, 99), 3),
        },
        load_before,
        loadavg(),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
