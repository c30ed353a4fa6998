"""HTTP callbacks to the backend: durable, ordered per job, signed, retried.

Events are appended to a per-job outbox in Redis (``ecg:cb:q:{job_id}``) and a
due-time index (``ecg:cb:due``). Dispatchers — a thread in every worker process
and one in the shim — deliver each job's events in order, holding a per-job
lock, with exponential backoff and jitter while the receiver is down. Nothing is
lost when a worker dies: the outbox lives in Redis.

Every POST carries ``X-ECG-Event-Id`` (receivers de-duplicate on it; the final
event's id is ``{job_id}:final``) and ``X-ECG-Signature: t=<unix>,v1=<hex>``, an
HMAC-SHA256 over ``"<t>.<body>"`` with the shared signing key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import redis
import structlog

from ecg_audio import event_log

QUEUE_PREFIX = "ecg:cb:q:"
DUE_KEY = "ecg:cb:due"
LOCK_PREFIX = "ecg:cb:lock:"
FINAL_PREFIX = "ecg:cb:final:"
DELIVERED_KEY = "ecg:cb:delivered"  # counter, for operators and tests
DEAD_PREFIX = "ecg:cb:dead:"

log = structlog.get_logger("ecg.callbacks")


def sign(key: bytes, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(
    key: bytes | str, header: str, body: bytes, *, tolerance_s: int = 300, now: float | None = None
) -> bool:
    """Check an ``X-ECG-Signature`` header on a callback body (for backend engineers).

    Returns True only when the HMAC matches and the timestamp is within ``tolerance_s``.
    """
    if isinstance(key, str):
        key = key.encode()
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        ts = int(parts["t"])
        given = parts["v1"]
    except (ValueError, KeyError):
        return False
    now = time.time() if now is None else now
    if abs(now - ts) > tolerance_s:
        return False
    expected = sign(key, ts, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, given)


@dataclass(frozen=True)
class DeliveryPolicy:
    timeout_s: float = 10.0
    max_attempts: int = 8
    backoff_base_s: float = 0.5
    backoff_max_s: float = 60.0
    lock_ttl_s: float = 60.0

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)], at least 50 ms."""
        cap = min(self.backoff_max_s, self.backoff_base_s * (2 ** max(0, attempt)))
        return max(0.05, random.uniform(0, cap))


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

    # --- producing -----------------------------------------------------
    def enqueue(
        self, job_id: str, url: str, payload: dict[str, Any], *, final: bool = False, event_id: str | None = None
    ) -> str | None:
        """Append an event; a job's final event is enqueued once, whatever happens. Returns the event id.

        ``event_id``: the id the job's event log (``ecg_audio.event_log``) gave this event, so the
        callback and the event stream carry the same one; made here when not given."""
        event_id = event_id or event_log.new_event_id(job_id, final=final)
        if final and not self.r.set(FINAL_PREFIX + job_id, event_id, nx=True, ex=7 * 24 * 3600):
            return None
        event = {"event_id": event_id, "url": url, "payload": {**payload, "event_id": event_id}, "attempts": 0}
        pipe = self.r.pipeline()
        pipe.rpush(QUEUE_PREFIX + job_id, json.dumps(event))
        pipe.zadd(DUE_KEY, {job_id: time.time()}, nx=True)
        pipe.execute()
        return event_id

    # --- delivering ----------------------------------------------------
    def deliver_due(self, client: httpx.Client, *, limit: int = 20) -> int:
        """Deliver what is due now; returns the number of events delivered."""
        delivered = 0
        for job_id in self.r.zrangebyscore(DUE_KEY, 0, time.time(), start=0, num=limit):
            delivered += self._deliver_job(client, job_id.decode() if isinstance(job_id, bytes) else str(job_id))
        return delivered

    def _deliver_job(self, client: httpx.Client, job_id: str) -> int:
        token = uuid.uuid4().hex
        lock = LOCK_PREFIX + job_id
        if not self.r.set(lock, token, nx=True, px=int(self.policy.lock_ttl_s * 1000)):
            return 0
        delivered = 0
        try:
            qkey = QUEUE_PREFIX + job_id
            while True:
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
                ok, permanent = self._post(client, event)
                if ok:
                    self.r.lpop(qkey)
                    self.r.incr(DELIVERED_KEY)
                    delivered += 1
                    continue
                event["attempts"] += 1
                if permanent or event["attempts"] >= self.policy.max_attempts:
                    # keep it for operators; move on so later events are not blocked forever
                    self.r.rpush(DEAD_PREFIX + job_id, json.dumps(event))
                    self.r.lpop(qkey)
                    log.warning(
                        "callback_given_up", job_id=job_id, event_id=event["event_id"], attempts=event["attempts"]
                    )
                    continue
                self.r.lset(qkey, 0, json.dumps(event))
                self.r.zadd(DUE_KEY, {job_id: time.time() + self.policy.backoff(event["attempts"])})
                return delivered
        finally:
            # release only our own lock
            if self.r.get(lock) in (token, token.encode()):
                self.r.delete(lock)

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
