"""HTTP callbacks to the backend: durable, ordered per job, signed, retried.

Events are appended to a per-job outbox in Redis (``ecg:cb:q:{job_id}``) and a
due-time index (``ecg:cb:due``) by the one event builder (``ecg_audio.job_events``).
Dispatchers — a thread in every worker process and one in the shim — deliver each
job's events in order, holding a per-job lock (a redis-py ``Lock``), with exponential
backoff and jitter while the receiver is down. Nothing is lost when a worker dies:
the outbox lives in Redis.

One POST is bounded by a total deadline (``DeliveryPolicy.deadline_s``; httpx's
timeout is per read, and a trickling receiver could hold it for ever), and the lock
is renewed while it runs. The outbox is changed only by a script that checks, in the
same step, that this dispatcher still owns the lock and that the head is the event it
posted: a dispatcher that lost its lock pops, re-writes or dead-letters nothing. A job
delivers at most ``batch_per_job`` events per turn, so one busy or slow receiver does not
hold up the others.

Every POST carries ``X-ECG-Event-Id`` (receivers de-duplicate on it; the final
event's id is ``{job_id}:final:{run}``) and ``X-ECG-Signature: t=<unix>,v1=<hex>``, an
HMAC-SHA256 over ``"<t>.<body>"`` with the shared signing key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import httpx
import redis
import structlog
from redis.exceptions import LockError, LockNotOwnedError

from ecg_audio import keys

QUEUE_PREFIX = keys.CALLBACK_QUEUE
DUE_KEY = keys.CALLBACK_DUE
LOCK_PREFIX = keys.CALLBACK_LOCK
DELIVERED_KEY = keys.CALLBACK_DELIVERED  # counter, for operators and tests
DEAD_PREFIX = keys.CALLBACK_DEAD

log = structlog.get_logger("ecg.callbacks")


def sign(key: bytes, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(
    key: bytes | str, header: Any, body: Any, *, tolerance_s: int = 300, now: float | None = None
) -> bool:
    """Check an ``X-ECG-Signature`` header on a callback body (for backend engineers).

    Returns True only when the HMAC matches and the timestamp is within ``tolerance_s``; False for
    anything else, a malformed header included (it never raises: the header comes from the network).
    """
    try:
        if isinstance(key, str):
            key = key.encode()
        if isinstance(header, bytes):
            header = header.decode("ascii")
        if not isinstance(header, str) or not isinstance(body, bytes | bytearray) or not key:
            return False
        parts: dict[str, str] = {}
        for part in header.split(","):
            name, sep, value = part.strip().partition("=")
            if not sep or name in parts:
                return False  # not k=v, or a field twice (which one would count?)
            parts[name] = value
        ts_text, given = parts["t"], parts["v1"]
        if not ts_text.isascii() or not ts_text.isdigit() or len(ts_text) > 12:
            return False
        if len(given) != 64 or not given.isascii():
            return False
        ts = int(ts_text)
        now = time.time() if now is None else now
        if abs(now - ts) > tolerance_s:
            return False
        expected = sign(key, ts, bytes(body)).split("v1=", 1)[1]
        return hmac.compare_digest(expected, given.lower())
    except (ValueError, KeyError, TypeError, UnicodeError, OverflowError):
        return False


@dataclass(frozen=True)
class DeliveryPolicy:
    timeout_s: float = 10.0
    max_attempts: int = 8
    backoff_base_s: float = 0.5
    backoff_max_s: float = 60.0
    lock_ttl_s: float = 60.0  # renewed while a POST runs; lapses only when its dispatcher is gone
    deadline_s: float = 30.0  # one POST, all of it (connect, send, every read)
    batch_per_job: int = 20  # events of one job per turn before the other due jobs get theirs
    dead_ttl_s: int = 7 * 24 * 3600  # dead letters expire (Redis runs noeviction) ...
    dead_max: int = 100  # ... and at most this many are kept per job

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)], at least 50 ms."""
        cap = min(self.backoff_max_s, self.backoff_base_s * (2 ** max(0, attempt)))
        return max(0.05, random.uniform(0, cap))


# The only way the outbox's head changes once a dispatcher took it: checked and done in one step.
# KEYS: lock, queue, dead list, due index. ARGV: lock token, the head as posted, mode ('pop' |
# 'dead' | 'retry'), new head / dead entry, due score, job id, dead ttl, dead max.
# Returns 1 done; -1 the lock is not ours (any more); -2 the head is not the event we posted.
_FENCED_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('LINDEX', KEYS[2], 0) ~= ARGV[2] then return -2 end
if ARGV[3] == 'pop' then
  redis.call('LPOP', KEYS[2])
elseif ARGV[3] == 'dead' then
  redis.call('LPOP', KEYS[2])
  redis.call('RPUSH', KEYS[3], ARGV[4])
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[8]), -1)
  redis.call('EXPIRE', KEYS[3], ARGV[7])
else
  redis.call('LSET', KEYS[2], 0, ARGV[4])
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[6])
end
return 1
"""


class CallbackOutbox:
    def __init__(
        self,
        client: redis.Redis,
        policy: DeliveryPolicy | None = None,
        signing_key: str | None = None,
        guard: Any | None = None,
    ):
        """``guard``: a ``media_io.fetch.GuardedHttp``; when given, every POST goes through the SSRF
        guard (address checked and pinned at delivery time, redirects refused)."""
        self.r = client
        self.policy = policy or DeliveryPolicy()
        self.key = signing_key.encode() if signing_key else None
        self.guard = guard
        self._fenced = client.register_script(_FENCED_LUA)
        # POSTs run here so that the dispatcher can bound each by a total deadline and renew its lock
        self._posts = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ecg-callback-post")

    # --- delivering ----------------------------------------------------
    def deliver_due(self, client: httpx.Client, *, limit: int = 20) -> int:
        """Deliver what is due now; returns the number of events delivered."""
        delivered = 0
        for job_id in self.r.zrangebyscore(DUE_KEY, 0, time.time(), start=0, num=limit):
            delivered += self._deliver_job(client, job_id.decode() if isinstance(job_id, bytes) else str(job_id))
        return delivered

    def _fence(self, lock: Any, job_id: str, head: Any, mode: str, new: str = "", due: float = 0.0) -> int:
        keys = [LOCK_PREFIX + job_id, QUEUE_PREFIX + job_id, DEAD_PREFIX + job_id, DUE_KEY]
        args = [lock.local.token, head, mode, new, repr(due), job_id, self.policy.dead_ttl_s, self.policy.dead_max]
        rc = int(self._fenced(keys=keys, args=args))  # type: ignore[arg-type]
        if rc != 1:
            log.warning("callback_lock_lost", job_id=job_id, mode=mode, code=rc)
        return rc

    def _deliver_job(self, client: httpx.Client, job_id: str) -> int:
        lock = self.r.lock(LOCK_PREFIX + job_id, timeout=self.policy.lock_ttl_s, blocking=False, thread_local=False)
        if not lock.acquire(blocking=False):
            return 0
        delivered = 0
        qkey = QUEUE_PREFIX + job_id
        try:
            for _ in range(self.policy.batch_per_job):
                raw = self.r.lindex(qkey, 0)
                if raw is None:
                    # nothing left: drop the index entry unless a producer added one meanwhile
                    pipe = self.r.pipeline()
                    pipe.zrem(DUE_KEY, job_id)
                    pipe.llen(qkey)
                    _, left = pipe.execute()
                    if left:
                        self.r.zadd(DUE_KEY, {job_id: time.time()})
                    return delivered
                event = json.loads(raw)
                ok, permanent = self._post_within_deadline(client, event, lock)
                if ok:
                    if self._fence(lock, job_id, raw, "pop") != 1:
                        return delivered  # another dispatcher owns this job now: it carries on
                    self.r.incr(DELIVERED_KEY)
                    delivered += 1
                    continue
                event["attempts"] += 1
                if permanent or event["attempts"] >= self.policy.max_attempts:
                    # keep it for operators; move on so later events are not blocked forever
                    if self._fence(lock, job_id, raw, "dead", json.dumps(event)) != 1:
                        return delivered
                    log.warning(
                        "callback_given_up", job_id=job_id, event_id=event["event_id"], attempts=event["attempts"]
                    )
                    continue
                due = time.time() + self.policy.backoff(event["attempts"])
                self._fence(lock, job_id, raw, "retry", json.dumps(event), due)
                return delivered
            # this job's turn is over: the other due jobs go first
            self.r.zadd(DUE_KEY, {job_id: time.time()})
            return delivered
        finally:
            try:
                lock.release()
            except LockError:  # lapsed or taken: not ours to release
                pass

    def _post_within_deadline(self, client: httpx.Client, event: dict[str, Any], lock: Any) -> tuple[bool, bool]:
        """``_post`` bounded by ``deadline_s`` in all; the job's lock is renewed while it runs."""
        future = self._posts.submit(self._post, client, event)
        deadline = time.monotonic() + self.policy.deadline_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                # the POST may still finish in its thread: at least once, and the receiver de-duplicates
                log.info("callback_retry", event_id=event["event_id"], reason="deadline")
                return False, False
            try:
                return future.result(timeout=min(left, self.policy.lock_ttl_s / 3))
            except FutureTimeout:
                try:
                    lock.reacquire()
                except LockNotOwnedError:
                    return False, False  # lapsed and taken: the owner posts it; our fenced ops refuse

    def close(self) -> None:
        self._posts.shutdown(wait=False, cancel_futures=True)

    def _post(self, client: httpx.Client, event: dict[str, Any]) -> tuple[bool, bool]:
        body = json.dumps(event["payload"], ensure_ascii=False, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "X-ECG-Event-Id": event["event_id"]}
        if self.key:
            headers["X-ECG-Signature"] = sign(self.key, int(time.time()), body)
        try:
            if self.guard is not None:
                status = self._post_guarded(event["url"], body, headers)
            else:
                status = client.post(
                    event["url"], content=body, headers=headers, timeout=self.policy.timeout_s
                ).status_code
        except httpx.HTTPError as e:
            log.info("callback_retry", event_id=event["event_id"], reason=type(e).__name__)
            return False, False
        except Exception as e:  # the guard's refusals and network errors carry .retryable
            retryable = bool(getattr(e, "retryable", False))
            log.info(
                "callback_retry" if retryable else "callback_refused",
                event_id=event["event_id"],
                reason=getattr(e, "message", type(e).__name__),
            )
            return False, not retryable
        if status < 300:
            return True, False
        # 4xx other than 408/429 will not get better by retrying
        permanent = 400 <= status < 500 and status not in (408, 409, 425, 429)
        log.info("callback_rejected", event_id=event["event_id"], status=status)
        return False, permanent

    def _post_guarded(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        checked = self.guard.check(url)  # type: ignore[union-attr]
        with self.guard.open(checked, method="POST", headers=headers, content=body) as (_, resp):  # type: ignore[union-attr]
            return int(resp.status_code)

    def pending(self, job_id: str) -> int:
        return int(self.r.llen(QUEUE_PREFIX + job_id))  # type: ignore[arg-type]


class Dispatcher:
    """A daemon thread that keeps delivering due callbacks."""

    def __init__(
        self,
        outbox: CallbackOutbox,
        *,
        interval_s: float = 0.2,
        client_factory: Callable[[], httpx.Client] | None = None,
    ):
        self.outbox = outbox
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._client_factory = client_factory or (lambda: httpx.Client(follow_redirects=False))
        self._thread: threading.Thread | None = None

    def start(self) -> Dispatcher:
        self._thread = threading.Thread(target=self._run, name="ecg-callbacks", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        with self._client_factory() as client:
            while not self._stop.is_set():
                try:
                    n = self.outbox.deliver_due(client)
                except redis.RedisError as e:
                    log.warning("callback_dispatcher_redis_error", error=str(e))
                    n = 0
                except Exception:  # a bug here must not kill the thread silently
                    log.exception("callback_dispatcher_error")
                    n = 0
                if not n:
                    self._stop.wait(self.interval_s)
