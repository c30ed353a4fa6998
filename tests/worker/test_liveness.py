"""worker/liveness.py against a real Redis and real kombu messages (taken, not acknowledged): a dead
worker's messages come back, a restarted-in-place worker does not swallow its previous life's
messages, and a peer whose clock is behind is not taken for dead."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from kombu import Connection

from tests.helpers import wait_for
from worker import liveness
from worker.liveness import Liveness


@pytest.fixture
def app(redis_url: str) -> Celery:
    a = Celery("liveness-test")
    a.conf.broker_url = redis_url
    return a


@pytest.fixture
def taken(redis_url: str) -> Iterator[tuple[str, str]]:
    """A message taken from a fresh queue and left unacknowledged (as by a worker that then died):
    (queue name, delivery tag)."""
    queue = f"lv-{uuid.uuid4().hex[:8]}"
    conn = Connection(redis_url)
    q = conn.SimpleQueue(queue)
    q.put({"job": "x"})
    msg = q.get(timeout=5)
    # kept open for the test: closing the channel would give the message back itself
    yield queue, str(msg.delivery_tag)
    conn.release()


def _queued(r: redis.Redis, queue: str) -> int:
    return int(r.llen(queue))  # type: ignore[arg-type]


def test_ids_are_unique_per_process_start() -> None:
    # same host, same PID (a container restarted in place): still two different workers
    assert liveness.worker_id() != liveness.worker_id()


def test_dead_workers_messages_are_restored(redis_url: str, app: Celery, taken: tuple[str, str]) -> None:
    queue, tag = taken
    r = redis.Redis.from_url(redis_url)
    dead = Liveness(r, app, interval_s=0.2, dead_after_s=1)
    dead.hold(tag)  # then dies: no more beats, no stop()
    peer = Liveness(r, app, interval_s=0.2, dead_after_s=1)
    peer.beat()
    assert peer.reap() == 0  # still alive for a second
    assert _queued(r, queue) == 0
    before = int(r.get(liveness.RESTORED_KEY) or 0)
    wait_for(lambda: peer.beat() or peer.reap() > 0, 60, interval=0.2, what="the dead worker's message restored")
    assert _queued(r, queue) == 1  # back in its queue, for anyone to take
    assert int(r.get(liveness.RESTORED_KEY) or 0) == before + 1
    assert peer.reap() == 0  # once


def test_restart_in_place_restores_the_previous_lifes_messages(
    redis_url: str, app: Celery, taken: tuple[str, str]
) -> None:
    """The old process died holding a message; the new one (same hostname, same PID here) must neither
    adopt and drop it nor leave it to the visibility timeout: it is restored within seconds."""
    queue, tag = taken
    r = redis.Redis.from_url(redis_url)
    old = Liveness(r, app, interval_s=0.2, dead_after_s=1)
    old.hold(tag)
    new = Liveness(r, app, interval_s=0.2, dead_after_s=1)
    new.beat()  # the new life's first beat: holds nothing
    wait_for(lambda: new.beat() or new.reap() > 0, 60, interval=0.2, what="the previous life's message restored")
    assert _queued(r, queue) == 1


def test_a_peer_with_a_slow_clock_is_not_taken_for_dead(
    redis_url: str, app: Celery, taken: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    queue, tag = taken
    r = redis.Redis.from_url(redis_url)
    real_time, real_monotonic = time.time, time.monotonic

    class Skewed:
        """The peer host's clock runs 120 s behind."""

        @staticmethod
        def time() -> float:
            return real_time() - 120

        monotonic = staticmethod(real_monotonic)

    peer = Liveness(r, app, interval_s=0.2, dead_after_s=2)
    peer.id = f"other-host:1:{uuid.uuid4().hex[:8]}"  # another machine
    reaper = Liveness(r, app, interval_s=0.2, dead_after_s=2)
    monkeypatch.setattr(liveness, "time", Skewed)
    peer.hold(tag)
    peer.beat()
    monkeypatch.setattr(liveness, "time", time)
    t_end = time.monotonic() + 4
    while time.monotonic() < t_end:  # the peer keeps beating (with its clock); the reaper reaps
        monkeypatch.setattr(liveness, "time", Skewed)
        peer.hold(tag)
        monkeypatch.setattr(liveness, "time", time)
        assert reaper.reap() == 0
        # its bookkeeping is intact: should it die now, its message would be restored
        assert r.sismember(liveness.INFLIGHT_PREFIX + peer.id, tag)
        time.sleep(0.3)
    assert _queued(r, queue) == 0  # still the live peer's


def test_a_message_orphaned_by_a_lost_connection_is_restored(
    redis_url: str, app: Celery, taken: tuple[str, str]
) -> None:
    """A live worker held a message, the stage ended (or was cancelled) but its acknowledgement was
    lost with the broker connection (a Redis restart): nobody holds it, nobody acked it. It must
    come back within a few beats, not after the visibility timeout."""
    queue, tag = taken
    r = redis.Redis.from_url(redis_url)
    w = Liveness(r, app, interval_s=0.05, dead_after_s=30)
    w.hold(tag)
    wait_for(lambda: w.beat() or _queued(r, queue) == 1, 60, interval=0.2, what="the orphaned message restored")
