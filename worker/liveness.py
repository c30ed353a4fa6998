"""Dead-worker recovery: give a killed worker's unfinished message back to the queue in seconds.

With ``task_acks_late`` a stage's message stays unacknowledged while it runs. If
the pool child dies, Celery's parent rejects it (``task_reject_on_worker_lost``)
and it is requeued at once. But when the whole worker dies (SIGKILL, OOM
killer, a spot instance reclaimed), Redis only hands the message out again after
``visibility_timeout`` — which must be longer than the longest stage, i.e. hours.

So every worker (its Celery parent process, which holds and acknowledges the
messages) keeps, in Redis, a heartbeat and the delivery tags it holds. The
heartbeat is a key that Redis itself expires (``SET … EX dead_after_s``): a worker
is dead when its key is gone, so no host ever compares its clock with another's
(clock skew cannot make a live peer look dead). Any live worker that finds a
peer's heartbeat gone restores that peer's messages with kombu's own
``restore_by_tag``, unless the message was acknowledged meanwhile or is now held
by a live worker.

A worker's id is ``hostname:pid:boot``, ``boot`` random per process start: a
container restarted in place (``restart: unless-stopped``) keeps its hostname and
often its PID, and must not adopt (and then drop) its previous life's messages.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any

import redis
import structlog

from ecg_audio import keys

log = structlog.get_logger("ecg.liveness")

WORKERS_KEY = keys.WORKERS  # set: ids of workers that announced themselves
HEARTBEAT_PREFIX = keys.WORKER_HEARTBEAT  # string per worker, expired by Redis after dead_after_s
INFLIGHT_PREFIX = keys.WORKER_INFLIGHT  # set per worker: delivery tags held
REAPER_LOCK = keys.WORKERS_REAPER_LOCK
RESTORED_KEY = keys.WORKERS_RESTORED  # counter: messages restored from dead workers (operators, chaos bench)
ORPHANS_KEY = keys.WORKERS_ORPHANS_RESTORED  # counter: unacknowledged messages no live worker held
UNACKED = "unacked"  # kombu's Redis transport: delivery tag -> the message, while unacknowledged


def worker_id() -> str:
    """``hostname:pid:boot``: unique per process start, even when hostname and PID repeat."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


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
        self._orphans: set[str] = set()

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

    def _alive(self, pipe: Any) -> None:
        pipe.set(HEARTBEAT_PREFIX + self.id, "1", ex=max(1, int(round(self.dead_after_s))))
        pipe.sadd(WORKERS_KEY, self.id)

    def hold(self, delivery_tag: str | None) -> None:
        """Record a message the moment it is received (the periodic beat would leave a window)."""
        if delivery_tag:
            self._recent[str(delivery_tag)] = time.monotonic()
            pipe = self.r.pipeline()
            pipe.sadd(INFLIGHT_PREFIX + self.id, str(delivery_tag))
            self._alive(pipe)
            pipe.execute()

    # --- background ----------------------------------------------------------
    def beat(self) -> None:
        now = time.monotonic()
        tags = self.held_tags()
        # a tag recorded by hold() may not be in Celery's state yet: keep it a little while
        self._recent = {t: at for t, at in list(self._recent.items()) if now - at < 3 * self.interval_s}
        key = INFLIGHT_PREFIX + self.id
        stale = {t.decode() if isinstance(t, bytes) else str(t) for t in self.r.smembers(key)}  # type: ignore[union-attr]
        stale -= tags | set(self._recent)
        self._restore_orphans(stale, tags | set(self._recent))
        pipe = self.r.pipeline()
        if tags:
            pipe.sadd(key, *tags)
        if stale:
            pipe.srem(key, *stale)
        self._alive(pipe)
        pipe.execute()

    def _restore_orphans(self, stale: set[str], held: set[str]) -> None:
        """A message this worker no longer holds yet nobody acknowledged: its acknowledgement was lost
        with a broker connection (a Redis restart while the stage ran), or the stage was cancelled.
        Without this it would wait the visibility timeout (hours). Seen stale on two beats in a row
        first, so that an acknowledgement on its way is not mistaken for a lost one."""
        candidates, self._orphans = self._orphans - held, stale
        for tag in candidates:
            if self.r.hexists(UNACKED, tag):
                self._restore(tag)
                self.r.incr(ORPHANS_KEY)
                log.warning("orphaned_message_restored", delivery_tag=tag)

    def start(self) -> Liveness:
        self.beat()
        self._thread = threading.Thread(target=self._run, name="ecg-liveness", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Leave the fleet: heartbeat, membership and in-flight set go. A message still unacknowledged
        (a cold shutdown) keeps this worker listed, heartbeat gone, so that a peer's reaper restores it
        and then removes the rest, as for a dead worker."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(1.0, 2 * self.interval_s))  # a beat in progress would add them back
        try:
            key = INFLIGHT_PREFIX + self.id
            tags = [t.decode() if isinstance(t, bytes) else str(t) for t in self.r.smembers(key)]  # type: ignore[union-attr]
            unacked = [t for t in tags if self.r.hexists(UNACKED, t)]
            pipe = self.r.pipeline()
            pipe.delete(HEARTBEAT_PREFIX + self.id)
            if not unacked:
                pipe.delete(key)
                pipe.srem(WORKERS_KEY, self.id)
            pipe.execute()
        except redis.RedisError as e:
            log.warning("liveness_stop_failed", error=str(e))

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
        """Restore the messages of workers whose heartbeat Redis has expired. Returns how many."""
        lock = self.r.lock(REAPER_LOCK, timeout=max(1.0, self.interval_s), blocking=False, thread_local=False)
        if not lock.acquire(blocking=False):
            return 0
        restored = 0
        try:
            ids = [w.decode() if isinstance(w, bytes) else str(w) for w in self.r.smembers(WORKERS_KEY)]  # type: ignore[union-attr]
            pipe = self.r.pipeline()
            for wid in ids:
                pipe.exists(HEARTBEAT_PREFIX + wid)
            alive = {wid for wid, up in zip(ids, pipe.execute(), strict=True) if up}
            alive.add(self.id)
            for wid in set(ids) - alive:
                n = 0
                for tag in self.r.smembers(INFLIGHT_PREFIX + wid):  # type: ignore[union-attr]
                    tag = tag.decode() if isinstance(tag, bytes) else str(tag)
                    # acknowledged (or restored already) since: nothing to do
                    if not self.r.hexists(UNACKED, tag):
                        continue
                    # redelivered to a live worker meanwhile: it is that worker's now
                    if any(self.r.sismember(INFLIGHT_PREFIX + w, tag) for w in alive):
                        continue
                    self._restore(tag)
                    n += 1
                    log.warning("message_restored_from_dead_worker", dead_worker=wid, delivery_tag=tag)
                pipe = self.r.pipeline()
                pipe.delete(INFLIGHT_PREFIX + wid)
                pipe.srem(WORKERS_KEY, wid)
                if n:
                    pipe.incrby(RESTORED_KEY, n)
                pipe.execute()
                restored += n
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:  # lapsed: another reaper may run now, harmlessly
                pass
        return restored

    def _restore(self, tag: str) -> None:
        """Put an unacknowledged message back on its queue under a NEW delivery tag.

        kombu's ``restore_by_tag`` keeps the tag, so the restored copy and the one its first holder
        still runs (a live worker taken for dead during a Redis outage) share it, and the first
        holder's acknowledgement would delete the second copy's entry in ``unacked``: should the
        second worker then die, its message would be gone. Otherwise this is kombu's own restore
        (one WATCH/MULTI transaction: out of ``unacked``, back on its queue, marked redelivered)."""
        from kombu.utils.json import loads

        with self.app.connection_for_write() as conn:
            channel = conn.default_channel
            qos = channel.qos

            def restore(pipe: Any) -> None:
                raw = pipe.hget(qos.unacked_key, tag)
                pipe.multi()
                qos._remove_from_indices(tag, pipe)
                if raw:
                    payload, exchange, routing_key = loads(raw.decode() if isinstance(raw, bytes) else raw)
                    payload["properties"]["delivery_tag"] = str(uuid.uuid4())
                    channel._do_restore_message(payload, exchange, routing_key, pipe, False)

            with channel.conn_or_acquire(channel.client) as client:
                client.transaction(restore, qos.unacked_key)
