"""Dead-worker recovery: give a killed worker's unfinished message back to the queue in seconds.

With ``task_acks_late`` a stage's message stays unacknowledged while it runs. If
the pool child dies, Celery's parent rejects it (``task_reject_on_worker_lost``)
and it is requeued at once. But when the whole worker dies (SIGKILL, OOM
killer, a spot instance reclaimed), Redis only hands the message out again after
``visibility_timeout`` — which must be longer than the longest stage, i.e. hours.

So every worker (its Celery parent process, which holds and acknowledges the
messages) keeps, in Redis, a heartbeat and the delivery tags it holds. Any
live worker that sees a peer silent for ``dead_after_s`` restores
that peer's messages with kombu's own ``restore_by_tag``. A message that was
meanwhile redelivered to someone else is left alone: it is restored only if its
delivery time is not newer than the dead worker's last heartbeat.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import redis
import structlog

log = structlog.get_logger("ecg.liveness")

WORKERS_KEY = "ecg:workers"  # hash: worker id -> last heartbeat (unix time)
INFLIGHT_PREFIX = "ecg:inflight:"  # set per worker: delivery tags held
REAPER_LOCK = "ecg:workers:reaper"
UNACKED_INDEX = "unacked_index"  # kombu's Redis transport: delivery tag -> delivery time


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Liveness:
    def __init__(self, client: redis.Redis, celery_app: Any, *, interval_s: float = 5.0, dead_after_s: float = 30.0):
        self.r = client
        self.app = celery_app
        self.id = worker_id()
        self.interval_s = interval_s
        self.dead_after_s = dead_after_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._recent: dict[str, float] = {}

    # --- what this worker holds ---------------------------------------------
    @staticmethod
    def held_tags() -> set[str]:
        """Delivery tags of the messages this worker process (the Celery parent) holds unacknowledged."""
        from celery.worker import state

        tags: set[str] = set()
        # scheduled = held until an ETA (a retry with a countdown): unacknowledged all the same
        held = list(state.reserved_requests) + list(state.active_requests) + list(state.scheduled_requests)
        for req in held:
            tag = getattr(getattr(req, "message", None), "delivery_tag", None)
            if tag:
                tags.add(str(tag))
        return tags

    def hold(self, delivery_tag: str | None) -> None:
        """Record a message the moment it is received (the periodic beat would leave a window)."""
        if delivery_tag:
            self._recent[str(delivery_tag)] = time.time()
            pipe = self.r.pipeline()
            pipe.sadd(INFLIGHT_PREFIX + self.id, str(delivery_tag))
            pipe.hset(WORKERS_KEY, self.id, time.time())
            pipe.execute()

    # --- background ----------------------------------------------------------
    def beat(self) -> None:
        now = time.time()
        tags = self.held_tags()
        # a tag recorded by hold() may not be in Celery's state yet: keep it a little while
        self._recent = {t: at for t, at in list(self._recent.items()) if now - at < 3 * self.interval_s}
        key = INFLIGHT_PREFIX + self.id
        stale = {t.decode() if isinstance(t, bytes) else str(t) for t in self.r.smembers(key)}
        stale -= tags | set(self._recent)
        pipe = self.r.pipeline()
        if tags:
            pipe.sadd(key, *tags)
        if stale:
            pipe.srem(key, *stale)
        pipe.hset(WORKERS_KEY, self.id, now)
        pipe.execute()

    def start(self) -> Liveness:
        self.beat()
        self._thread = threading.Thread(target=self._run, name="ecg-liveness", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self.r.hdel(WORKERS_KEY, self.id)
        except redis.RedisError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
                self.reap()
            except redis.RedisError as e:
                log.warning("liveness_redis_error", error=str(e))
            except Exception:
                log.exception("liveness_error")

    def reap(self) -> int:
        """Restore the messages of workers silent for longer than ``dead_after_s``."""
        if not self.r.set(REAPER_LOCK, self.id, nx=True, px=int(self.interval_s * 1000)):
            return 0
        restored = 0
        now = time.time()
        for wid, last in self.r.hgetall(WORKERS_KEY).items():
            wid = wid.decode() if isinstance(wid, bytes) else wid
            last_seen = float(last)
            if wid == self.id or now - last_seen < self.dead_after_s:
                continue
            for tag in self.r.smembers(INFLIGHT_PREFIX + wid):
                tag = tag.decode() if isinstance(tag, bytes) else tag
                delivered_at = self.r.zscore(UNACKED_INDEX, tag)
                # gone (acked, or already restored) or redelivered to a live worker since: leave it
                if delivered_at is None or delivered_at > last_seen + 1.0:
                    continue
                self._restore(tag)
                restored += 1
                log.warning("message_restored_from_dead_worker", dead_worker=wid, delivery_tag=tag)
            self.r.delete(INFLIGHT_PREFIX + wid)
            self.r.hdel(WORKERS_KEY, wid)
        return restored

    def _restore(self, tag: str) -> None:
        with self.app.connection_for_write() as conn:
            channel = conn.default_channel
            channel.qos.restore_by_tag(tag, client=channel.client)
