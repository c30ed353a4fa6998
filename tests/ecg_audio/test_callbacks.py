"""Callbacks against a real HTTP receiver and a real Redis: order, signatures, retries, the lock."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis

from ecg_audio import callbacks
from ecg_audio.callbacks import CallbackOutbox, DeliveryPolicy, Dispatcher, sign, verify_signature
from ecg_audio.jobs import JobStore
from tests.helpers import wait_for, wait_for_renewals

KEY = "k3y-for-tests"


def enqueue(r: redis.Redis, job: str, url: str, progress: int) -> str:
    """A progress event of ``job`` into its outbox, written as every job's are: by the event builder, for a
    record whose callback is ``url``. Returns the event's id."""
    store = JobStore(r, ttl_s=600)
    store.create(job, {"video_url": "https://media.example/a.wav", "callback_url": url})
    assert store.events.progress(job, progress=progress, stage="ingest", message="Working")
    return str(json.loads(r.lindex(callbacks.QUEUE_PREFIX + job, -1))["event_id"])  # type: ignore[arg-type]


class AttemptReceiver:
    """Records every attempt, answered or refused: (event_id, status it answered, time).

    With ``hold`` set, each POST is recorded in ``arrived`` and then kept open, unanswered,
    until the test lets it go (``release``): a receiver as slow as the test needs, with no clock.
    """

    def __init__(self) -> None:
        self.attempts: list[tuple[str, int, float]] = []
        self.arrived: list[str] = []
        self.delivered: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.fail_with: int | None = None
        self.reject_ids: set[str] = set()  # answered 410
        self.hold = False
        self._gate = threading.Semaphore(0)
        self.lock = threading.Lock()
        rcv = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                event = json.loads(body)
                with rcv.lock:
                    rcv.arrived.append(event["event_id"])
                if rcv.hold:
                    rcv._gate.acquire(timeout=600)
                status = 410 if event["event_id"] in rcv.reject_ids else (rcv.fail_with or 200)
                with rcv.lock:
                    rcv.attempts.append((event["event_id"], status, time.time()))
                    if status == 200:
                        rcv.delivered.append(event)
                        rcv.headers.append({k.lower(): v for k, v in self.headers.items()} | {"_body": body.decode()})
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.daemon_threads = True
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/cb"

    def release(self, n: int = 1) -> None:
        """Let ``n`` held POSTs (present or future) be answered."""
        self._gate.release(n)

    def failed(self) -> list[tuple[str, int, float]]:
        with self.lock:
            return [a for a in self.attempts if a[1] != 200]

    def ids(self) -> list[str]:
        with self.lock:
            return [e["event_id"] for e in self.delivered]

    def close(self) -> None:
        self.hold = False
        self.release(1000)  # nothing stays held
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def rcv() -> Any:
    r = AttemptReceiver()
    yield r
    r.close()


def _job() -> str:
    return f"cb-{uuid.uuid4().hex[:8]}"


def test_signature_roundtrip_and_tamper() -> None:
    body = b'{"a":1}'
    header = sign(KEY.encode(), int(time.time()), body)
    assert verify_signature(KEY, header, body)
    assert not verify_signature(KEY, header, body + b" ")
    assert not verify_signature("other", header, body)
    old = sign(KEY.encode(), int(time.time()) - 3600, body)
    assert not verify_signature(KEY, old, body)


_NOW = int(time.time())
_GOOD = sign(KEY.encode(), _NOW, b"{}")
_MAC = _GOOD.split("v1=", 1)[1]


@pytest.mark.parametrize(
    "header",
    [
        "garbage",
        "",
        None,
        123,
        b"\xff\xfe",
        "t=,v1=",
        f"t=abc,v1={_MAC}",
        f"t={_NOW}",
        f"v1={_MAC}",
        f"t={_NOW},v1=",
        f"t={_NOW},v1=zz",
        f"t={_NOW},v1={'é' * 64}",  # non-ASCII: hmac.compare_digest would raise TypeError
        f"t={_NOW},v1={_MAC[:-1]}",
        f"t={_NOW},v1={_MAC},v1={_MAC}",
        f"t={_NOW},t={_NOW},v1={_MAC}",
        f"t=1e400,v1={_MAC}",
        f"t={'9' * 400},v1={_MAC}",
        f"t=-{_NOW},v1={_MAC}",
        f"t={_NOW}v1={_MAC}",
        ",,,",
        "=,=",
    ],
)
def test_verify_signature_false_on_malformed_headers(header: Any) -> None:
    assert verify_signature(KEY, _GOOD, b"{}", now=_NOW)  # the well-formed one passes
    assert verify_signature(KEY, header, b"{}", now=_NOW) is False


def test_events_delivered_in_order_and_signed(redis_url: str, rcv: AttemptReceiver) -> None:
    box = CallbackOutbox(redis.Redis.from_url(redis_url), DeliveryPolicy(backoff_base_s=0.05), KEY)
    job = _job()
    ids = [enqueue(box.r, job, rcv.url(), p) for p in (10, 25, 40)]
    with httpx.Client() as c:
        box.deliver_due(c)
    assert rcv.ids() == ids
    for h in rcv.headers:
        assert verify_signature(KEY, h["x-ecg-signature"], h["_body"].encode())
        assert h["x-ecg-event-id"] == json.loads(h["_body"])["event_id"]
    assert box.pending(job) == 0


def test_receiver_down_then_back_gets_everything(redis_url: str, rcv: AttemptReceiver) -> None:
    rcv.fail_with = 503
    box = CallbackOutbox(
        redis.Redis.from_url(redis_url), DeliveryPolicy(backoff_base_s=0.05, backoff_max_s=0.3, max_attempts=100), KEY
    )
    job = _job()
    ids = [enqueue(box.r, job, rcv.url(), p) for p in (10, 100)]
    d = Dispatcher(box, interval_s=0.05).start()
    try:
        wait_for(lambda: len(rcv.failed()) >= 3, 60)  # the receiver saw (and refused) retries
        assert rcv.ids() == []
        assert {a[0] for a in rcv.failed()} == {ids[0]}  # only the head is tried: order is kept
        rcv.fail_with = None
        wait_for(lambda: len(rcv.ids()) == 2, 60)
        assert rcv.ids() == ids
    finally:
        d.stop()


def test_permanent_rejection_does_not_block_later_events(redis_url: str, rcv: AttemptReceiver) -> None:
    r = redis.Redis.from_url(redis_url)
    box = CallbackOutbox(r, DeliveryPolicy(backoff_base_s=0.01), None)
    job = _job()
    first = enqueue(box.r, job, rcv.url(), 10)
    later = [enqueue(box.r, job, rcv.url(), p) for p in (25, 40)]
    rcv.reject_ids = {first}
    with httpx.Client() as c:
        box.deliver_due(c)
    assert [a[:2] for a in rcv.attempts] == [(first, 410), (later[0], 200), (later[1], 200)]  # no retry of a 410
    assert rcv.ids() == later
    assert box.pending(job) == 0
    dead = [json.loads(e) for e in r.lrange(callbacks.DEAD_PREFIX + job, 0, -1)]
    assert [e["event_id"] for e in dead] == [first]


def test_default_policy_dead_letters_after_a_long_outage(
    redis_url: str, rcv: AttemptReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default policy (8 attempts, backoff to 60 s) against a receiver that is down for good: the
    event ends on the dead-letter list after exactly 8 attempts, spaced by growing backoff (Redis time
    driven by a fake clock, so the outage costs no wall time), and the next event is then delivered."""
    clock = [time.time()]
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(time=lambda: clock[0], monotonic=time.monotonic))
    r = redis.Redis.from_url(redis_url)
    policy = DeliveryPolicy()
    assert policy.max_attempts == 8
    box = CallbackOutbox(r, policy, KEY)
    job = _job()
    first = enqueue(box.r, job, rcv.url(), 10)
    rcv.fail_with = 503
    start = clock[0]
    with httpx.Client() as c:
        for _ in range(50):
            box.deliver_due(c)
            if r.llen(callbacks.DEAD_PREFIX + job):
                break
            due = r.zscore(callbacks.DUE_KEY, job)
            assert due is not None and due > clock[0]  # backed off, not retried at once
            clock[0] = due
        assert len(rcv.failed()) == 8 and {a[0] for a in rcv.failed()} == {first}
        assert [json.loads(e)["attempts"] for e in r.lrange(callbacks.DEAD_PREFIX + job, 0, -1)] == [8]
        assert clock[0] - start > 1.0  # the attempts were spread over time
        rcv.fail_with = None
        nxt = enqueue(box.r, job, rcv.url(), 20)
        box.deliver_due(c)
    assert rcv.ids() == [nxt]


def test_slow_receiver_two_dispatchers_each_event_once_in_order(redis_url: str, rcv: AttemptReceiver) -> None:
    """Each POST outlasts the dispatch lock's TTL: the lock is renewed while it runs, so the second
    dispatcher never posts the same head, and nothing is popped that was not delivered."""
    rcv.hold = True
    # the TTL is short so that outliving it takes seconds, and long enough that the renewal (every
    # TTL/3) is never so late on a loaded machine that a live lock lapses
    policy = DeliveryPolicy(lock_ttl_s=3.0, backoff_base_s=0.05, backoff_max_s=0.2, max_attempts=50)
    job = _job()
    r = redis.Redis.from_url(redis_url)
    boxes = [CallbackOutbox(redis.Redis.from_url(redis_url), policy, KEY) for _ in range(2)]
    ids = [enqueue(boxes[0].r, job, rcv.url(), p) for p in (10, 25, 40)]
    ds = [Dispatcher(b, interval_s=0.02).start() for b in boxes]
    try:
        for n in range(1, len(ids) + 1):
            wait_for(lambda n=n: len(rcv.arrived) >= n, 60, what=f"POST {n} at the receiver")
            # held open past the lock's TTL: 4 renewals of TTL/3 each, while the other dispatcher polls
            wait_for_renewals(r, callbacks.LOCK_PREFIX + job, 4)
            rcv.release()
        wait_for(lambda: boxes[0].pending(job) == 0 and len(rcv.ids()) == len(ids), 60, what="all delivered")
    finally:
        for d in ds:
            d.stop()
    # both dispatchers have stopped: every POST either of them made has arrived
    assert rcv.arrived == ids, rcv.arrived  # each posted once, in order
    assert rcv.ids() == ids


def test_slow_receiver_does_not_stall_other_jobs(redis_url: str, rcv: AttemptReceiver) -> None:
    """One receiver hangs (does not answer while the test runs; httpx's per-read timeout is 30 s):
    the total deadline ends that attempt, and another job's callback goes out meanwhile."""
    fast = AttemptReceiver()
    try:
        rcv.hold = True
        policy = DeliveryPolicy(timeout_s=30.0, deadline_s=1.0, backoff_base_s=0.5, max_attempts=50)
        q = redis.Redis.from_url(redis_url)
        box = CallbackOutbox(q, policy, KEY)
        slow_job, fast_job = _job(), _job()
        slow_id = enqueue(box.r, slow_job, rcv.url(), 10)
        d = Dispatcher(box, interval_s=0.02).start()
        try:
            wait_for(lambda: rcv.arrived[:1] == [slow_id], 60, what="the POST to the hung receiver")
            fast_id = enqueue(box.r, fast_job, fast.url(), 10)
            wait_for(lambda: fast.ids() == [fast_id], 60, what="the other job's callback")
            assert rcv.attempts == [], "the hung receiver answered: nothing was left to stall"
            # the hung attempt was ended by the deadline: counted and kept for a retry, not lost
            def head() -> dict[str, Any]:
                return dict(json.loads(q.lindex(callbacks.QUEUE_PREFIX + slow_job, 0) or "{}"))  # type: ignore[arg-type]

            wait_for(lambda: head().get("attempts", 0) >= 1, 60, what="the hung attempt counted")
            assert head()["event_id"] == slow_id and box.pending(slow_job) == 1
        finally:
            d.stop()
            box.close()
    finally:
        fast.close()


def test_dead_letters_expire_and_are_trimmed(redis_url: str, rcv: AttemptReceiver) -> None:
    r = redis.Redis.from_url(redis_url)
    box = CallbackOutbox(r, DeliveryPolicy(dead_max=3, dead_ttl_s=3600), None)
    job = _job()
    ids = [enqueue(box.r, job, rcv.url(), p) for p in range(5)]
    rcv.reject_ids = set(ids)
    with httpx.Client() as c:
        box.deliver_due(c)
    dead = [json.loads(e)["event_id"] for e in r.lrange(callbacks.DEAD_PREFIX + job, 0, -1)]
    assert dead == ids[-3:]
    assert 0 < r.ttl(callbacks.DEAD_PREFIX + job) <= 3600
