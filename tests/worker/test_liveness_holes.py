"""worker/liveness.py, issue 23's holes, against a real Redis and real kombu messages: a restored copy
gets its own delivery tag (its first holder's acknowledgement cannot remove it), and a stopped worker
leaves no in-flight set behind."""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis
from celery import Celery
from kombu import Connection

from worker import liveness
from worker.liveness import Liveness


def _app(redis_url: str) -> Celery:
    a = Celery("liveness-holes-test")
    a.conf.broker_url = redis_url
    return a


def _poll(fn: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(0.1)
    return False


def test_a_restored_copy_cannot_be_acked_away_by_its_first_holder(redis_url: str) -> None:
    """A live worker taken for dead (its heartbeat expired while Redis was away): its message is
    restored and a second worker takes it. The first worker then finishes and acknowledges: the second
    worker's copy must still be unacknowledged in Redis (kombu's restore kept the delivery tag, so that
    acknowledgement deleted the other's entry, and a death of the second worker lost the message)."""
    r = redis.Redis.from_url(redis_url)
    queue = f"lv-{uuid.uuid4().hex[:8]}"
    first, second = Connection(redis_url), Connection(redis_url)
    try:
        first.SimpleQueue(queue).put({"job": "x"})
        taken = first.SimpleQueue(queue).get(timeout=5)
        slow = Liveness(r, _app(redis_url), interval_s=0.2, dead_after_s=1)
        slow.hold(str(taken.delivery_tag))  # then misses its beats (Redis away): taken for dead
        peer = Liveness(r, _app(redis_url), interval_s=0.2, dead_after_s=1)
        assert _poll(lambda: peer.beat() or peer.reap() > 0, 15), "not restored"
        copy = second.SimpleQueue(queue).get(timeout=5)
        assert copy.payload == {"job": "x"}
        assert copy.delivery_tag != taken.delivery_tag
        taken.ack()  # the first holder ends (it lost its lease: it publishes nothing) and acknowledges
        assert r.hexists(liveness.UNACKED, str(copy.delivery_tag)), "the second copy was acked away"
        copy.ack()
        assert not r.hexists(liveness.UNACKED, str(copy.delivery_tag))
    finally:
        first.release()
        second.release()


def test_a_stopped_worker_leaves_no_inflight_set(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    w = Liveness(r, _app(redis_url), interval_s=0.1, dead_after_s=5).start()
    w.hold("tag-acknowledged-meanwhile")  # held, then acknowledged: not in kombu's unacked hash
    assert r.exists(liveness.INFLIGHT_PREFIX + w.id)
    w.stop()
    assert not r.exists(liveness.INFLIGHT_PREFIX + w.id)
    assert not r.exists(liveness.HEARTBEAT_PREFIX + w.id)
    assert not r.sismember(liveness.WORKERS_KEY, w.id)


def test_a_worker_stopped_holding_a_message_leaves_it_to_a_peer(redis_url: str) -> None:
    """A cold shutdown with a message still unacknowledged: the set stays until a peer restores the
    message, then it goes too."""
    r = redis.Redis.from_url(redis_url)
    queue = f"lv-{uuid.uuid4().hex[:8]}"
    conn = Connection(redis_url)
    try:
        conn.SimpleQueue(queue).put({"job": "y"})
        taken = conn.SimpleQueue(queue).get(timeout=5)
        w = Liveness(r, _app(redis_url), interval_s=0.1, dead_after_s=5).start()
        w.hold(str(taken.delivery_tag))
        w.stop()
        peer = Liveness(r, _app(redis_url), interval_s=0.1, dead_after_s=5)
        peer.beat()
        assert peer.reap() == 1 and int(r.llen(queue)) == 1  # type: ignore[arg-type]
        assert not r.exists(liveness.INFLIGHT_PREFIX + w.id)
        assert not r.sismember(liveness.WORKERS_KEY, w.id)
    finally:
        conn.release()
