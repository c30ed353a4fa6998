"""What ``/health`` reports, measured at most once per interval.

Counting workers is a Celery broadcast (``control.ping``): a PUBLISH to every worker and
half a second of waiting for replies, on a thread. Done per call, an unauthenticated flood
of ``/health`` held every thread of the pool and wedged kombu (50 concurrent calls: none
answered in two minutes), starving ``/jobs``. So the report is cached for ``ttl_s``, one
refresh runs at a time, and callers arriving during a refresh get the previous report.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import redis

import celeryconfig
from api_shim.schemas import Health

HEALTH_TTL_S = 5.0


def queue_depth(
    r: redis.Redis, queues: tuple[str, ...] = (celeryconfig.MODEL_QUEUE, celeryconfig.CPU_QUEUE)
) -> dict[str, int]:
    """Messages waiting per queue, priority sub-queues included."""
    from ecg_audio.chain import queue_key

    pipe = r.pipeline()
    names: list[str] = []
    for q in queues:
        for p in celeryconfig.PRIORITY_STEPS:
            names.append(q)
            pipe.llen(queue_key(q, p))
    out: dict[str, int] = dict.fromkeys(queues, 0)
    for q, n in zip(names, pipe.execute(), strict=True):
        out[q] += int(n)
    return out


class HealthProbe:
    def __init__(self, r: redis.Redis, celery: Callable[[], Any], ttl_s: float = HEALTH_TTL_S) -> None:
        self.r = r
        self.celery = celery
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._report: Health | None = None
        self._at = 0.0

    def fresh(self) -> Health | None:
        """The cached report if it is recent enough, else None (the caller refreshes, in a thread)."""
        if self._report is not None and time.monotonic() - self._at < self.ttl_s:
            return self._report
        return None

    def refresh(self) -> Health:
        """Measure again, unless another thread is doing so and there is a report to serve meanwhile."""
        stale = self._report
        if not self._lock.acquire(blocking=stale is None):
            assert stale is not None
            return stale
        try:
            report = self.fresh()
            if report is None:
                report = self._measure()
                self._report, self._at = report, time.monotonic()
            return report
        finally:
            self._lock.release()

    def _measure(self) -> Health:
        try:
            self.r.ping()
            depth = queue_depth(self.r)
        except redis.RedisError:
            return Health(status="degraded", broker=False, workers=0, queue_depth={})
        try:
            workers = len(self.celery().control.ping(timeout=0.5) or [])
        except Exception:
            workers = 0
        return Health(status="ok" if workers else "degraded", broker=True, workers=workers, queue_depth=depth)
