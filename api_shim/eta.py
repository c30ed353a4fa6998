"""What a waiting person wants to know: how many jobs are ahead, and how long it will take.

* ``queue_position``: jobs ahead of this one in its queue: its rank in the queue list's
  waiting line (``ecg_audio.queues.WAITING_PREFIX``, a sorted set kept beside the list by the
  submission and event scripts: O(log n), however long the queue) plus every job waiting in the
  more urgent priority sub-queues (a count each).
* ``eta_s``: the audio's duration (on the record once ingest has run) times each remaining
  stage's measured speed (seconds of work per second of audio: the median over the most
  recent completed jobs' ``metadata.stage_times``), less the part of the current stage done.
  None until both are known.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import redis

from ecg_audio.jobs import ALL_SET, PREFIX, JobRecord, JobStatus, JobStore, is_terminal
from ecg_audio.queues import PRIORITY_SEP, waiting_key
from ecg_audio.stage_table import STAGE_BY_NAME
from ecg_audio.stage_table import STAGE_NAMES as STAGES

SPEEDS_TTL_S = 60.0
RECENT_JOBS = 200  # newest jobs looked at for completed ones
SPEED_SAMPLES = 20  # completed jobs whose stage times make the medians


class ProgressEstimator:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.r: redis.Redis = store.r
        self._lock = threading.Lock()
        self._speeds: dict[str, float] = {}
        self._speeds_at = -SPEEDS_TTL_S

    def queue_position(self, rec: JobRecord) -> int | None:
        if rec.status != JobStatus.QUEUED or not rec.queue_key:
            return None
        queue, _, step = rec.queue_key.partition(PRIORITY_SEP)
        mine = int(step or 0)
        # kombu's Redis transport serves lower priority steps first: those lines are all ahead
        ahead = [queue] if mine > 0 else []
        ahead += [f"{queue}{PRIORITY_SEP}{p}" for p in range(1, mine)]
        pipe = self.r.pipeline(transaction=False)
        pipe.zrank(waiting_key(rec.queue_key), rec.job_id)
        for key in [rec.queue_key, *ahead]:
            pipe.llen(key)
        for key in ahead:
            pipe.zcard(waiting_key(key))
        rank, mine, *rest = pipe.execute()
        if rank is None:
            return None  # taken a moment ago (or its message was purged by an operator)
        lengths, waiting = rest[: len(ahead)], rest[len(ahead) :]
        # a worker pops the message a moment before the record leaves 'queued': the list's length
        # bounds the count meanwhile
        within = max(0, min(int(rank), int(mine) - 1))
        return within + sum(min(int(w), int(n)) for w, n in zip(waiting, lengths, strict=True))

    def eta_s(self, rec: JobRecord) -> float | None:
        if is_terminal(rec.status) or not rec.duration:
            return None
        speeds = self.speeds()
        if not speeds or any(s not in speeds for s in STAGES):
            return None
        done = _stage_done(rec)
        remaining = sum(speeds[s] * rec.duration * (1.0 - done.get(s, 0.0)) for s in STAGES)
        return round(remaining, 1)

    def speeds(self) -> dict[str, float]:
        """Median seconds of work per second of audio, per stage, over recent completed jobs (cached)."""
        with self._lock:
            if time.monotonic() - self._speeds_at < SPEEDS_TTL_S:
                return self._speeds
            self._speeds = self._measure()
            self._speeds_at = time.monotonic()
            return self._speeds

    def _measure(self) -> dict[str, float]:
        ids = [str(i) for i in self.r.zrevrange(ALL_SET, 0, RECENT_JOBS - 1)]  # type: ignore[union-attr]
        pipe = self.r.pipeline()
        for job_id in ids:
            pipe.hget(PREFIX + job_id, "status")
        completed = [j for j, st in zip(ids, pipe.execute(), strict=True) if st == JobStatus.COMPLETED][:SPEED_SAMPLES]
        samples: dict[str, list[float]] = {s: [] for s in STAGES}
        for job_id in completed:
            env = self.store.get_result(job_id) or {}
            md: dict[str, Any] = (env.get("result") or {}).get("metadata") or {}
            duration = float(md.get("duration") or 0)
            if duration <= 0:
                continue
            for stage, seconds in (md.get("stage_times") or {}).items():
                if stage in samples:
                    samples[stage].append(float(seconds) / duration)
        return {s: statistics.median(v) for s, v in samples.items() if v}


def _stage_done(rec: JobRecord) -> dict[str, float]:
    """Fraction done of each stage, from the record's stage and progress (stage milestones in order)."""
    if rec.status == JobStatus.QUEUED or rec.stage not in STAGE_BY_NAME:
        return {}
    out: dict[str, float] = {}
    before = 0
    for name in STAGES:
        end = STAGE_BY_NAME[name].done.progress
        if name == rec.stage:
            out[name] = max(0.0, min(1.0, (rec.progress - before) / max(1, end - before)))
            break
        out[name] = 1.0
        before = end
    return out
