"""Callbacks against a real HTTP receiver and a real Redis: order, Standard Webhooks signatures, the retry
schedule, which failures retry, replay, bulkheads (deadline, per-host limit) and the lock."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from standardwebhooks import Webhook, WebhookVerificationError

from ecg_audio import callbacks
from ecg_audio.callbacks import CallbackOutbox, DeliveryPolicy, Dispatcher, async_twin
from ecg_audio.webhook_secrets import WebhookSecrets
from tests.helpers import wait_for

ROOT = "root-key-for-tests"
FAST = DeliveryPolicy(schedule_s=(0.05, 0.05, 0.05), jitter=0.0)


class AttemptReceiver:
    """Records every attempt, answered or refused: (event_id, status it answered, time)."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, int, float]] = []
        self.delivered: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.fail_with: int | None = None
        self.retry_after: str | None = None
        self.reject_ids: set[str] = set()  # answered 410
        self.delay_s = 0.0
        self.open_now = 0
        self.open_max = 0
        self.lock = threading.Lock()
        rcv = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                with rcv.lock:
                    rcv.open_now += 1
                    rcv.open_max = max(rcv.open_max, rcv.open_now)
                try:
                    self._answer()
                finally:
                    with rcv.lock:
                        rcv.open_now -= 1

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if rcv.delay_s:
                    time.sleep(rcv.delay_s)
                event = json.loads(body)
                status = 410 if event["event_id"] in rcv.reject_ids else (rcv.fail_with or 200)
                with rcv.lock:
                    rcv.attempts.append((event["event_id"], status, time.time()))
                    if status == 200:
                        rcv.delivered.append(event)
                        rcv.headers.append({k.lower(): v for k, v in self.headers.items()} | {"_body": body.decode()})
                self.send_response(status)
                if rcv.retry_after and status != 200:
                    self.send_header("Retry-After", rcv.retry_after)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.daemon_threads = True
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/cb"

    def failed(self) -> list[tuple[str, int, float]]:
        with self.lock:
            return [a for a in self.attempts if a[1] != 200]

    def ids(self) -> list[str]:
        with self.lock:
            return [e["event_id"] for e in self.delivered]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def rcv() -> Any:
    r = AttemptReceiver()
    yield r
    r.close()


def _wait(cond: Any, timeout: float) -> bool:
    """``tests.helpers.wait_for`` as a truth value (False when ``timeout`` passed first)."""
    try:
        wait_for(cond, timeout)
    except TimeoutError:
        return False
    return True


def _job() -> str:
    return f"cb-{uuid.uuid4().hex[:8]}"


def deliver_once(box: CallbackOutbox, job_id: str) -> int:
    """One delivery turn of one job, in a fresh event loop (what a dispatcher's task does)."""

    async def run() -> int:
        ar = async_twin(box.r)
        try:
            return await box.deliver_job(ar, ar.register_script(callbacks._FENCED_LUA), job_id)
        finally:
            await ar.aclose()

    return asyncio.run(run())


def test_events_delivered_in_order_and_signed_per_key(redis_url: str, rcv: AttemptReceiver) -> None:
    r = redis.Redis.from_url(redis_url)
    box = CallbackOutbox(r, FAST, ROOT)
    secrets = WebhookSecrets(r, ROOT, 3600)
    job = _job()
    ids = [box.enqueue(job, rcv.url(), {"job_id": job, "progress": p}, owner="tenant-a") for p in (10, 25, 40)]
    assert deliver_once(box, job) == 3
    assert rcv.ids() == ids
    mine, theirs = Webhook(secrets.current("tenant-a")), Webhook(secrets.current("tenant-b"))
    for h in rcv.headers:
        assert h["webhook-id"] == json.loads(h["_body"])["event_id"]
        assert mine.verify(h["_body"].encode(), h)["event_id"] == h["webhook-id"]
        with pytest.raises(WebhookVerificationError):
            theirs.verify(h["_body"].encode(), h)  # another key's secret does not verify it
        assert not any(k.startswith("x-ecg-") for k in h)  # one scheme
    assert box.pending(job) == 0


def test_rotation_overlap_both_secrets_sign(redis_url: str, rcv: AttemptReceiver) -> None:
    r = redis.Redis.from_url(redis_url)
    box, secrets = CallbackOutbox(r, FAST, ROOT), WebhookSecrets(r, ROOT, 3600)
    owner = f"t-{uuid.uuid4().hex[:6]}"
    old = secrets.current(owner)
    new, until = secrets.rotate(owner)
    assert new != old and secrets.current(owner) == new and until > time.time() + 3500
    job = _job()
    box.enqueue(job, rcv.url(), {"job_id": job}, owner=owner)
    deliver_once(box, job)
    h = rcv.headers[0]
    assert len(h["webhook-signature"].split(" ")) == 2
    for s in (old, new):
        Webhook(s).verify(h["_body"].encode(), h)
    secrets.rotate(owner, overlap_s=0)  # no overlap: only the newest signs
    job2 = _job()
    box.enqueue(job2, rcv.url(), {"job_id": job2}, owner=owner)
    deliver_once(box, job2)
    h2 = rcv.headers[1]
    assert len(h2["webhook-signature"].split(" ")) == 1
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(h2["_body"].encode(), h2)


def test_unsigned_without_root_key(redis_url: str, rcv: AttemptReceiver) -> None:
    box = CallbackOutbox(redis.Redis.from_url(redis_url), FAST, None)
    job = _job()
    box.enqueue(job, rcv.url(), {"job_id": job})
    deliver_once(box, job)
    assert "webhook-signature" not in rcv.headers[0] and rcv.headers[0]["webhook-id"]


def test_receiver_down_then_back_gets_everything_honouring_retry_after(redis_url: str, rcv: AttemptReceiver) -> None:
    rcv.fail_with, rcv.retry_after = 503, "1"
    policy = DeliveryPolicy(schedule_s=(3600.0,) * 20, jitter=0.0)  # only Retry-After can make it retry soon
    box = CallbackOutbox(redis.Redis.from_url(redis_url), policy, ROOT)
    job = _job()
    ids = [box.enqueue(job, rcv.url(), {"job_id": job, "progress": p}) for p in (10, 100)]
    d = Dispatcher(box, interval_s=0.05).start()
    try:
        assert _wait(lambda: len(rcv.failed()) >= 2, 30)  # the receiver saw (and refused) a retry
        gaps = [b[2] - a[2] for a, b in zip(rcv.failed(), rcv.failed()[1:], strict=False)]
        assert all(g >= 0.9 for g in gaps), gaps  # Retry-After: 1 was waited for
        assert rcv.ids() == []
        assert {a[0] for a in rcv.failed()} == {ids[0]}  # only the head is tried: order is kept
        rcv.fail_with = None
        assert _wait(lambda: len(rcv.ids()) == 2, 30)
        assert rcv.ids() == ids
    finally:
        d.stop()


@pytest.mark.parametrize("status", [400, 404, 409, 410, 422, 301])
def test_other_4xx_and_redirects_end_at_once(redis_url: str, rcv: AttemptReceiver, status: int) -> None:
    r = redis.Redis.from_url(redis_url)
    box = CallbackOutbox(r, FAST, None)
    job = _job()
    first = box.enqueue(job, rcv.url(), {"job_id": job, "progress": 10})
    later = box.enqueue(job, rcv.url(), {"job_id": job, "progress": 25})
    rcv.fail_with = status
    deliver_once(box, job)  # the first is final at once; the second, too (same answer)
    assert [a[:2] for a in rcv.attempts] == [(first, status), (later, status)]  # no retry
    assert [e["event_id"] for e in box.dead(job)] == [first, later]
    assert box.dead(job)[0]["last_error"] == f"HTTP {status}"


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
def test_5xx_408_429_are_retried(redis_url: str, rcv: AttemptReceiver, status: int) -> None:
    r = redis.Redis.from_url(redis_url)
    box = CallbackOutbox(r, DeliveryPolicy(schedule_s=(60.0,), jitter=0.0), None)
    job = _job()
    box.enqueue(job, rcv.url(), {"job_id": job})
    rcv.fail_with = status
    before = time.time()
    deliver_once(box, job)
    assert box.pending(job) == 1 and not box.dead(job)
    due = r.zscore(callbacks.DUE_KEY, job)
    assert due is not None and before + 59 <= due <= time.time() + 61  # the schedule's first wait


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_network_faults_are_retried_refused_dns_tls(redis_url: str) -> None:
    """Connection refused, a name that does not exist (NXDOMAIN, through the fleet's guarded poster),
    and a TLS handshake that fails all go back on the schedule; none is dead at the first try."""
    import functools

    from media_io.http import FetchLimits, GuardedHttp, post_async
    from media_io.urlguard import UrlPolicy

    tls_peer = socket.socket()  # accepts, then closes: the TLS handshake fails
    tls_peer.bind(("127.0.0.1", 0))
    tls_peer.listen(8)

    def close_all() -> None:
        while True:
            try:
                conn, _ = tls_peer.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=close_all, daemon=True).start()
    guard = GuardedHttp(
        policy=UrlPolicy(allowed_schemes=frozenset({"http", "https"}), allowlist=("127.0.0.1",)),
        limits=FetchLimits(timeout_s=5, max_redirects=0),
    )
    r = redis.Redis.from_url(redis_url)
    box = CallbackOutbox(r, DeliveryPolicy(schedule_s=(60.0,), jitter=0.0), None, functools.partial(post_async, guard))
    urls = {
        "refused": f"http://127.0.0.1:{_closed_port()}/cb",
        "nxdomain": "http://no-such-host.invalid/cb",
        "tls": f"https://127.0.0.1:{tls_peer.getsockname()[1]}/cb",
    }
    try:
        for kind, url in urls.items():
            job = _job()
            box.enqueue(job, url, {"job_id": job})
            deliver_once(box, job)
            assert box.pending(job) == 1 and not box.dead(job), kind
            entry = json.loads(r.lindex(callbacks.QUEUE_PREFIX + job, 0))  # type: ignore[arg-type]
            assert entry["attempts"] == 1 and entry["last_error"], kind
    finally:
        tls_peer.close()


def test_url_the_policy_refuses_is_final(redis_url: str) -> None:
    import functools

    from media_io.http import FetchLimits, GuardedHttp, post_async
    from media_io.urlguard import UrlPolicy

    guard = GuardedHttp(policy=UrlPolicy(allowed_schemes=frozenset({"http"})), limits=FetchLimits(max_redirects=0))
    box = CallbackOutbox(redis.Redis.from_url(redis_url), FAST, None, functools.partial(post_async, guard))
    job = _job()
    box.enqueue(job, "http://127.0.0.1:9/cb", {"job_id": job})  # loopback, not allowlisted
    deliver_once(box, job)
    assert [e["event_id"] for e in box.dead(job)] and box.pending(job) == 0


def test_default_schedule_outlives_a_day_and_restarts_lose_nothing(
    redis_url: str, rcv: AttemptReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default schedule against a receiver that is down for good (Redis time driven by a fake clock,
    so the outage costs no wall time): 8 attempts over at least 24 h, each wait the schedule's within its
    jitter; every attempt runs in a NEW outbox (a restarted dispatcher): the schedule is in Redis."""
    clock = [time.time()]
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(time=lambda: clock[0], monotonic=time.monotonic))
    r = redis.Redis.from_url(redis_url)
    policy = DeliveryPolicy()
    assert policy.max_attempts == 8 and policy.total_s * (1 - policy.jitter) >= 24 * 3600
    job = _job()
    first = CallbackOutbox(r, policy, ROOT).enqueue(job, rcv.url(), {"job_id": job, "progress": 10})
    rcv.fail_with = 503
    start, waits = clock[0], []
    for _ in range(20):
        deliver_once(CallbackOutbox(r, policy, ROOT), job)
        if r.llen(callbacks.DEAD_PREFIX + job):
            break
        due = r.zscore(callbacks.DUE_KEY, job)
        assert due is not None and due > clock[0]  # backed off, not retried at once
        waits.append(due - clock[0])
        clock[0] = due
    assert len(rcv.failed()) == 8 and {a[0] for a in rcv.failed()} == {first}
    for wait, step in zip(waits, policy.schedule_s, strict=True):
        assert step * 0.9 - 0.01 <= wait <= step * 1.1 + 0.01
    assert clock[0] - start >= 24 * 3600
    dead = CallbackOutbox(r, policy, ROOT).dead(job)
    assert [e["attempts"] for e in dead] == [8] and dead[0]["last_error"] == "HTTP 503"


def test_replay_resends_dead_letters_in_order_with_their_ids(redis_url: str, rcv: AttemptReceiver) -> None:
    from ecg_audio import event_log

    r = redis.Redis.from_url(redis_url)
    box = CallbackOutbox(r, DeliveryPolicy(schedule_s=(0.01,), jitter=0.0), ROOT)
    job = _job()
    body = {"job_id": job, "result": {"segments": []}}
    ids = [box.enqueue(job, rcv.url(), {**body, "progress": p}) for p in (10, 25, 40)]
    for i in ids:  # the job's event log, as the event builder writes it
        r.xadd(event_log.key(job), {"event_id": i, "payload": "{}"})
    rcv.fail_with = 500
    for _ in range(3):
        deliver_once(box, job)
        time.sleep(0.05)
    assert _wait(lambda: (deliver_once(box, job), len(box.dead(job)))[1] == 3, 10)
    rcv.fail_with = None
    with pytest.raises(callbacks.UnknownEvent):
        box.replay(job, since=f"{job}:nope")
    assert box.replay(job, since=ids[0]) == ids[1:]
    deliver_once(box, job)
    assert rcv.ids() == ids[1:]
    assert rcv.delivered[0]["result"] == {"segments": []}  # the body is what it was
    assert box.replay(job) == ids[:1]
    deliver_once(box, job)
    assert rcv.ids() == ids[1:] + ids[:1] and box.dead(job) == [] and box.replay(job) == []


def test_slow_receiver_two_dispatchers_each_event_once_in_order(redis_url: str, rcv: AttemptReceiver) -> None:
    """Each POST takes longer than the dispatch lock's TTL: the lock is renewed while it runs, so the
    second dispatcher never posts the same head, and nothing is popped that was not delivered. Three
    jobs start at once in each dispatcher's loop: nothing there may stall it past a lock's TTL (building
    an SSL context per POST did, and two first events went out twice)."""
    rcv.delay_s = 1.5
    policy = DeliveryPolicy(lock_ttl_s=1.0, schedule_s=(0.05,) * 50)
    jobs = [_job() for _ in range(3)]
    boxes = [CallbackOutbox(redis.Redis.from_url(redis_url), policy, ROOT) for _ in range(2)]
    ids = {j: [boxes[0].enqueue(j, rcv.url(), {"job_id": j, "progress": p}) for p in (10, 25, 40)] for j in jobs}
    ds = [Dispatcher(b, interval_s=0.02).start() for b in boxes]
    try:
        assert _wait(lambda: all(boxes[0].pending(j) == 0 for j in jobs), 90)
        assert not _wait(lambda: len(rcv.attempts) > 9, 2.0)  # a late duplicate would land now
    finally:
        for d in ds:
            d.stop()
    for j in jobs:
        assert [a[0] for a in rcv.attempts if a[0].startswith(j)] == ids[j], rcv.attempts  # once each, in order


def test_a_job_locked_by_another_dispatcher_is_not_polled_in_a_loop(redis_url: str, rcv: AttemptReceiver) -> None:
    """While one dispatcher holds a job's lock for a long POST, the other looks at that job once per
    interval, not as fast as its loop can go (a freed slot wakes the loop only after a delivery)."""
    rcv.delay_s = 4.0
    r = redis.Redis.from_url(redis_url)
    boxes = [CallbackOutbox(redis.Redis.from_url(redis_url), DeliveryPolicy(), ROOT) for _ in range(2)]
    job = _job()
    boxes[0].enqueue(job, rcv.url(), {"job_id": job})
    ds = [Dispatcher(b, interval_s=0.2).start() for b in boxes]
    try:
        assert _wait(lambda: r.exists(callbacks.LOCK_PREFIX + job), 10)
        before = int(r.info("stats")["total_commands_processed"])
        time.sleep(2.0)  # a measuring window inside the 4 s POST, not a wait for something to happen
        spent = int(r.info("stats")["total_commands_processed"]) - before
        assert _wait(lambda: rcv.ids() != [], 30)
    finally:
        for d in ds:
            d.stop()
    assert spent < 200, spent  # ~10 turns per dispatcher, a few commands each, and the lock renewals


class Trickler:
    """Accepts connections and answers one byte every ``every_s``; records when each connection ended."""

    def __init__(self, every_s: float) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.every_s = every_s
        self.opened: list[float] = []
        self.closed: list[float] = []
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
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with self.lock:
            self.opened.append(time.monotonic())
        try:
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                conn.sendall(bytes([byte]))
                # wait for the next byte's turn, noticing at once when the client hangs up
                ready, _, _ = select.select([conn], [], [], self.every_s)
                if ready and not conn.recv(65536, socket.MSG_PEEK):
                    return
                if ready:
                    conn.recv(65536)  # the request: read and ignored
        except OSError:
            pass
        finally:
            with self.lock:
                self.closed.append(time.monotonic())
            conn.close()

    def open_now(self) -> int:
        with self.lock:
            return len(self.opened) - len(self.closed)

    def close(self) -> None:
        self.sock.close()


def test_deadline_ends_a_trickling_request_and_per_host_limit_holds(redis_url: str, rcv: AttemptReceiver) -> None:
    """Ten jobs call a receiver that trickles a byte every 0.3 s (the answer would take ~12 s): at most
    ``per_host`` connections are ever open to it, each is closed by the deadline (not after the answer),
    and another host's job is delivered meanwhile."""
    slow = Trickler(0.3)
    policy = DeliveryPolicy(deadline_s=1.0, per_host=2, schedule_s=(0.2,) * 100, jitter=0.0)
    box = CallbackOutbox(redis.Redis.from_url(redis_url), policy, ROOT)
    peak = [0]
    try:
        for _ in range(10):
            j = _job()
            box.enqueue(j, slow.url(), {"job_id": j})
        fast_job = _job()
        fast_id = box.enqueue(fast_job, rcv.url(), {"job_id": fast_job})
        d = Dispatcher(box, interval_s=0.02).start()
        try:
            assert _wait(lambda: rcv.ids() == [fast_id], 15)

            def sample() -> bool:
                peak[0] = max(peak[0], slow.open_now())
                return len(slow.closed) >= 6

            assert _wait(sample, 60)
        finally:
            d.stop()
        assert 1 <= peak[0] <= 2, peak
        with slow.lock:
            durations = [c - o for o, c in zip(sorted(slow.opened), sorted(slow.closed), strict=False)]
        assert durations and max(durations) < 8.0, durations  # ended by the 1 s deadline, not the answer (~12 s)
    finally:
        slow.close()


def test_dead_letters_expire_and_are_trimmed(redis_url: str, rcv: AttemptReceiver) -> None:
    r = redis.Redis.from_url(redis_url)
    box = CallbackOutbox(r, DeliveryPolicy(dead_max=3, dead_ttl_s=3600), None)
    job = _job()
    ids = [box.enqueue(job, rcv.url(), {"job_id": job, "progress": p}) for p in range(5)]
    rcv.reject_ids = set(ids)
    deliver_once(box, job)
    dead = [json.loads(e)["event_id"] for e in r.lrange(callbacks.DEAD_PREFIX + job, 0, -1)]
    assert dead == ids[-3:]
    assert 0 < r.ttl(callbacks.DEAD_PREFIX + job) <= 3600
