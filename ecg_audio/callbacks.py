"""HTTP callbacks to the backend: durable, ordered per job, signed (Standard Webhooks), retried for a day.

Events are appended to a per-job outbox in Redis (``ecg:cb:q:{job_id}``) and a due-time index
(``ecg:cb:due``) by the one event builder (``ecg_audio.job_events``). Dispatchers (a thread in
every worker process and one in the shim, each running an asyncio loop) deliver each job's events
in order, holding a per-job lock (a redis-py ``Lock``). The retry schedule lives in Redis too: a
failed event's attempt count is in its outbox entry and its next time in the due index, so
restarting every dispatcher loses nothing and changes no timing.

Bulkheads: every POST runs as an asyncio task bounded by ``deadline_s`` in all (connect, send,
every read): at the deadline the request is cancelled and its connection closed, so a receiver
that trickles bytes holds nothing past it. A dispatcher runs at most ``max_inflight`` jobs at once
and at most ``per_host`` for one receiver host (``host:port``); a job whose host is full waits in
Redis (nothing queues in memory), so one tenant's slow receiver cannot take the others' turns.

The outbox is changed only by a script that checks, in the same step, that this dispatcher still
owns the lock: a dispatcher that lost it pops, re-writes or dead-letters nothing. Dead letters
(``ecg:cb:dead:{job_id}``) are kept for replay (``CallbackOutbox.replay``): they go back to the
front of the outbox, in order, with their original ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import json
import random
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
import redis.asyncio
import structlog
from redis.exceptions import LockError

from ecg_audio import event_log, keys
from ecg_audio.webhook_secrets import NO_OWNER, signing_async, webhook_headers

QUEUE_PREFIX = keys.CALLBACK_QUEUE
DUE_KEY = keys.CALLBACK_DUE
LOCK_PREFIX = keys.CALLBACK_LOCK
DELIVERED_KEY = keys.CALLBACK_DELIVERED  # counter, for operators and tests
DEAD_PREFIX = keys.CALLBACK_DEAD
RECORD_PREFIX = keys.JOB  # the job record (its ``owner`` picks the signing secret)

# 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h: 8 attempts over 27.6 h (24.8 h at the shortest jitter),
# so a receiver that is down for a night, or a whole day, still gets every event.
DEFAULT_SCHEDULE_S: tuple[float, ...] = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
RETRY_STATUSES = frozenset({408, 429})  # and every 5xx; any other 4xx (and 3xx: not followed) is final

log = structlog.get_logger("ecg.callbacks")

Poster = Callable[[str, bytes, dict[str, str], float], Awaitable[tuple[int, Any]]]


@dataclass(frozen=True)
class DeliveryPolicy:
    schedule_s: tuple[float, ...] = DEFAULT_SCHEDULE_S  # wait after the 1st, 2nd, ... failed attempt
    jitter: float = 0.1  # each wait is scaled by uniform(1 - jitter, 1 + jitter): no thundering herd
    timeout_s: float = 10.0  # connect, and each read
    deadline_s: float = 30.0  # one POST, all of it; then it is cancelled and retried on the schedule
    per_host: int = 8  # POSTs in flight to one receiver host, per dispatcher
    max_inflight: int = 64  # jobs delivering at once, per dispatcher
    host_busy_wait_s: float = 0.5  # when a whole scan is of full hosts: those jobs are looked at this much later
    lock_ttl_s: float = 60.0  # renewed while a POST runs; lapses only when its dispatcher is gone
    batch_per_job: int = 20  # events of one job per turn before the other due jobs get theirs
    dead_ttl_s: int = 7 * 24 * 3600  # dead letters expire (Redis runs noeviction) ...
    dead_max: int = 100  # ... and at most this many are kept per job

    @property
    def max_attempts(self) -> int:
        return len(self.schedule_s) + 1

    @property
    def total_s(self) -> float:
        return float(sum(self.schedule_s))

    def retry_delay(self, failed: int, retry_after: float | None = None) -> float | None:
        """Seconds until the next attempt after ``failed`` failed ones, or None: give up (dead letter).
        A receiver's ``Retry-After`` is honoured, up to the schedule's longest wait."""
        if failed > len(self.schedule_s):
            return None
        if retry_after is not None:
            return min(max(retry_after, 1.0), max(self.schedule_s))
        return self.schedule_s[failed - 1] * random.uniform(1 - self.jitter, 1 + self.jitter)


@dataclass
class Outcome:
    ok: bool = False
    permanent: bool = False
    lock_lost: bool = False
    retry_after: float | None = None
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After``: seconds or an HTTP date (RFC 9110); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def classify_status(status: int, headers: Any) -> Outcome:
    if 200 <= status < 300:
        return Outcome(ok=True)
    if status >= 500 or status in RETRY_STATUSES:
        ra = retry_after_s(headers.get("retry-after")) if status in (429, 503) and headers is not None else None
        return Outcome(retry_after=ra, reason=f"HTTP {status}")
    return Outcome(permanent=True, reason=f"HTTP {status}")


def classify_error(e: BaseException) -> Outcome:
    """Network faults (refused, reset, DNS, TLS, timeouts) are retried; a URL the policy refuses
    (its ``retryable`` is False: a private address, say) is final."""
    if getattr(e, "retryable", None) is False and not isinstance(e, httpx.HTTPError | OSError):
        return Outcome(permanent=True, reason=str(getattr(e, "message", e))[:200])
    return Outcome(reason=f"{type(e).__name__}: {str(e)[:160]}")


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    # built once: loading the CA bundle takes long enough (~0.1-1 s) to stall the dispatcher's loop,
    # and with it the renewal of the job locks, if every POST built its own
    return httpx.create_ssl_context()


async def plain_post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> tuple[int, Any]:
    """A POST without the URL guard (tests, benches); the fleet uses ``GuardedHttp.post_async``."""
    async with (
        httpx.AsyncClient(verify=_ssl_context(), timeout=timeout_s, follow_redirects=False, trust_env=False) as client,
        client.stream("POST", url, content=body, headers=headers) as resp,
    ):
        return resp.status_code, resp.headers


# The only way the outbox changes once a dispatcher took an event: checked and done in one step.
# KEYS: lock, queue, dead list, due index. ARGV: lock token, the entry as posted, mode ('pop' |
# 'dead' | 'retry'), new entry, due score, job id, dead ttl, dead max, now.
# Returns 1 done; -1 the lock is not ours (any more); -2 the entry is gone.
# The entry is found by value, not assumed at the head: a replay may have put events before it.
_FENCED_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local pos = redis.call('LPOS', KEYS[2], ARGV[2])
if not pos then return -2 end
if ARGV[3] == 'pop' then
  redis.call('LREM', KEYS[2], 1, ARGV[2])
elseif ARGV[3] == 'dead' then
  redis.call('LREM', KEYS[2], 1, ARGV[2])
  redis.call('RPUSH', KEYS[3], ARGV[4])
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[8]), -1)
  redis.call('EXPIRE', KEYS[3], ARGV[7])
else
  redis.call('LSET', KEYS[2], pos, ARGV[4])
  if pos == 0 then redis.call('ZADD', KEYS[4], ARGV[5], ARGV[6])
  else redis.call('ZADD', KEYS[4], ARGV[9], ARGV[6]) end
end
return 1
"""

# KEYS: dead list, queue, due index. ARGV: now, job id, then pairs (dead entry as stored, entry to send).
# Moves those dead letters that are still there to the front of the outbox, in the pairs' order (the
# entries are re-encoded in Python: cjson would turn an empty list into an object). Returns the count.
_REPLAY_LUA = """
local back = {}
for i = 3, #ARGV, 2 do
  if redis.call('LREM', KEYS[1], 1, ARGV[i]) == 1 then table.insert(back, ARGV[i + 1]) end
end
for i = #back, 1, -1 do redis.call('LPUSH', KEYS[2], back[i]) end
if #back > 0 then redis.call('ZADD', KEYS[3], ARGV[1], ARGV[2]) end
return #back
"""


class UnknownEvent(ValueError):
    """``since`` names no event of the job's event log."""


class CallbackOutbox:
    def __init__(
        self,
        client: redis.Redis,
        policy: DeliveryPolicy | None = None,
        signing_key: str | None = None,
        poster: Poster | None = None,
    ):
        """``signing_key``: the root key the per-key ``whsec_`` secrets derive from (None: unsigned).
        ``poster``: sends one POST (``GuardedHttp.post_async`` in the fleet: the SSRF guard checks and
        pins the address at delivery time, redirects refused); default ``plain_post``."""
        self.r = client
        self.policy = policy or DeliveryPolicy()
        self.root = signing_key.encode() if signing_key else None
        self.poster: Poster = poster or plain_post
        self._replay = client.register_script(_REPLAY_LUA)

    # --- producing -----------------------------------------------------
    def enqueue(self, job_id: str, url: str, payload: dict[str, Any], owner: str = "") -> str:
        """Append a raw event (tests, benches). Jobs' events are written by ``ecg_audio.job_events``,
        with the record's state, in one step. Returns the event id."""
        event_id = f"{job_id}:{uuid.uuid4().hex[:12]}"
        event = {"event_id": event_id, "url": url, "owner": owner, "payload": {**payload, "event_id": event_id}}
        pipe = self.r.pipeline()
        pipe.rpush(QUEUE_PREFIX + job_id, json.dumps({**event, "attempts": 0}))
        pipe.zadd(DUE_KEY, {job_id: time.time()}, nx=True)
        pipe.execute()
        return event_id

    def pending(self, job_id: str) -> int:
        return int(self.r.llen(QUEUE_PREFIX + job_id))  # type: ignore[arg-type]

    def dead(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.r.lrange(DEAD_PREFIX + job_id, 0, -1)]  # type: ignore[union-attr]

    def replay(self, job_id: str, since: str | None = None) -> list[str]:
        """Send a job's dead-lettered events again, in order, with their original ids; with ``since``
        (an event id of the job's log) only those after it. Returns the ids queued again."""
        raws = list(self.r.lrange(DEAD_PREFIX + job_id, 0, -1))  # type: ignore[arg-type]
        dead = [json.loads(raw) for raw in raws]
        wanted = {e["event_id"] for e in dead}
        if since is not None:
            logged = [_text(f.get(b"event_id", f.get("event_id", ""))) for _, f in self._log(job_id)]
            if since not in logged:
                raise UnknownEvent(f"{since!r} is not an event of job {job_id!r}")
            wanted &= set(logged[logged.index(since) + 1 :])
        pairs: list[str] = []
        ids: list[str] = []
        for raw, event in zip(raws, dead, strict=True):
            if event["event_id"] in wanted:
                event["attempts"] = 0
                event.pop("last_error", None)
                pairs += [_text(raw), json.dumps(event, ensure_ascii=False)]
                ids.append(event["event_id"])
        if not ids:
            return []
        keys = [DEAD_PREFIX + job_id, QUEUE_PREFIX + job_id, DUE_KEY]
        self._replay(keys=keys, args=[repr(time.time()), job_id, *pairs])  # type: ignore[arg-type]
        log.info("callback_replay", job_id=job_id, events=len(ids))
        return ids

    def _log(self, job_id: str) -> list[tuple[Any, dict[Any, Any]]]:
        return list(self.r.xrange(event_log.key(job_id)))  # type: ignore[arg-type]

    # --- delivering (asyncio, in the dispatcher's loop) ----------------
    async def deliver_job(self, ar: Any, fenced: Any, job_id: str) -> int:
        """Deliver one job's due events in order (one turn); returns how many were delivered."""
        lock = ar.lock(LOCK_PREFIX + job_id, timeout=self.policy.lock_ttl_s, blocking=False, thread_local=False)
        if not await lock.acquire(blocking=False):
            return 0
        delivered = 0
        qkey = QUEUE_PREFIX + job_id
        secrets: dict[str, list[str]] = {}
        try:
            for _ in range(self.policy.batch_per_job):
                raw = await ar.lindex(qkey, 0)
                if raw is None:
                    # nothing left: drop the index entry unless a producer added one meanwhile
                    async with ar.pipeline() as pipe:
                        _, left = await pipe.zrem(DUE_KEY, job_id).llen(qkey).execute()
                    if left:
                        await ar.zadd(DUE_KEY, {job_id: time.time()})
                    return delivered
                event = json.loads(raw)
                owner = event.get("owner") or await ar.hget(RECORD_PREFIX + job_id, "owner") or NO_OWNER
                owner = _text(owner)
                if owner not in secrets:
                    secrets[owner] = await signing_async(ar, self.root, owner)
                out = await self._attempt(lock, event, secrets[owner])
                if out.lock_lost:
                    return delivered  # the new owner carries on; our fenced ops would refuse anyway
                fence = _Fence(fenced, lock, job_id, raw, self.policy)
                if out.ok:
                    if await fence("pop") != 1:
                        return delivered
                    await ar.incr(DELIVERED_KEY)
                    delivered += 1
                    continue
                event["attempts"] = int(event.get("attempts", 0)) + 1
                event["last_error"] = out.reason
                delay = None if out.permanent else self.policy.retry_delay(event["attempts"], out.retry_after)
                if delay is None:
                    # kept for replay; later events go on (a final must not wait behind a dead milestone)
                    if await fence("dead", json.dumps(event)) != 1:
                        return delivered
                    log.warning("callback_given_up", job_id=job_id, event_id=event["event_id"], reason=out.reason)
                    continue
                await fence("retry", json.dumps(event), time.time() + delay)
                log.info("callback_retry", event_id=event["event_id"], reason=out.reason, in_s=round(delay, 1))
                return delivered
            await ar.zadd(DUE_KEY, {job_id: time.time()})  # this job's turn is over: the others go first
            return delivered
        finally:
            with contextlib.suppress(LockError):  # lapsed or taken: not ours to release
                await lock.release()

    async def _attempt(self, lock: Any, event: dict[str, Any], secrets: list[str]) -> Outcome:
        """One POST, bounded by ``deadline_s`` in all; the job's lock is renewed while it runs."""
        body = json.dumps(event["payload"], ensure_ascii=False, separators=(",", ":")).encode()
        headers = {"content-type": "application/json", **webhook_headers(secrets, event["event_id"], body)}
        post = asyncio.ensure_future(self.poster(event["url"], body, headers, self.policy.timeout_s))
        try:
            async with asyncio.timeout(self.policy.deadline_s):
                while True:
                    done, _ = await asyncio.wait({post}, timeout=self.policy.lock_ttl_s / 3)
                    if done:
                        break
                    await lock.reacquire()
            status, resp_headers = post.result()
            return classify_status(status, resp_headers)
        except TimeoutError:
            return Outcome(reason=f"deadline ({self.policy.deadline_s:g} s)")
        except LockError:
            # lapsed (this loop stalled past its TTL) and maybe taken: the POST is abandoned; it may
            # still land, and the new owner posts it again (at least once: receivers de-duplicate)
            log.warning("callback_lock_lapsed", event_id=event["event_id"])
            return Outcome(lock_lost=True)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            return classify_error(e)
        finally:
            if not post.done():
                post.cancel()
                with contextlib.suppress(BaseException):
                    await post


class _Fence:
    def __init__(self, script: Any, lock: Any, job_id: str, raw: Any, policy: DeliveryPolicy) -> None:
        self.script, self.lock, self.job_id, self.raw, self.policy = script, lock, job_id, raw, policy

    async def __call__(self, mode: str, new: str = "", due: float = 0.0) -> int:
        keys = [LOCK_PREFIX + self.job_id, QUEUE_PREFIX + self.job_id, DEAD_PREFIX + self.job_id, DUE_KEY]
        token = self.lock.local.token
        args = [token, self.raw, mode, new, repr(due), self.job_id, self.policy.dead_ttl_s, self.policy.dead_max]
        rc = int(await self.script(keys=keys, args=[*args, repr(time.time())]))
        if rc != 1:
            log.warning("callback_lock_lost", job_id=self.job_id, mode=mode, code=rc)
        return rc


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


_TWIN_KWARGS = frozenset(
    {"host", "port", "db", "username", "password", "path", "socket_timeout", "socket_connect_timeout", "client_name"}
)


def async_twin(client: redis.Redis) -> redis.asyncio.Redis:
    """An asyncio client to the same server as ``client`` (same address, database and credentials)."""
    pool = client.connection_pool
    # the address and credentials only: the rest (retry objects, handlers) are sync-client instances
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k in _TWIN_KWARGS or k.startswith("ssl_")}
    if issubclass(pool.connection_class, redis.UnixDomainSocketConnection):
        cls: type = redis.asyncio.UnixDomainSocketConnection
    elif issubclass(pool.connection_class, redis.SSLConnection):
        cls = redis.asyncio.SSLConnection
    else:
        cls = redis.asyncio.Connection
    return redis.asyncio.Redis(connection_pool=redis.asyncio.ConnectionPool(connection_class=cls, **kwargs))


def _host(raw: Any) -> str:
    try:
        return urlsplit(json.loads(raw)["url"]).netloc.lower()
    except (ValueError, KeyError, TypeError):
        return ""


class Dispatcher:
    """A daemon thread running an asyncio loop that keeps delivering due callbacks (see the bulkheads
    in the module docstring)."""

    def __init__(self, outbox: CallbackOutbox, *, interval_s: float = 0.2, scan: int = 500):
        self.outbox = outbox
        self.interval_s = interval_s
        self.scan = scan  # due jobs looked at per turn (those of full hosts are skipped, not waited for)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.active: dict[str, asyncio.Task[int]] = {}
        self.per_host: Counter[str] = Counter()
        self._wake: asyncio.Event | None = None  # set when a job's turn ends: its slot is free at once

    def start(self) -> Dispatcher:
        if self.outbox.root is None:
            log.warning("callbacks_unsigned", reason="no ECG_CALLBACK_SIGNING_KEY: receivers cannot verify callbacks")
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="ecg-callbacks", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    async def _main(self) -> None:
        ar = async_twin(self.outbox.r)
        fenced = ar.register_script(_FENCED_LUA)
        self._wake = asyncio.Event()
        await self._warm_up(ar)
        try:
            while not self._stop.is_set():
                self._wake.clear()
                try:
                    await self._turn(ar, fenced)
                except redis.RedisError as e:
                    log.warning("callback_dispatcher_redis_error", error=str(e))
                except Exception:  # a bug here must not kill the loop silently
                    log.exception("callback_dispatcher_error")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval_s)
        finally:
            for task in self.active.values():
                task.cancel()
            await asyncio.gather(*self.active.values(), return_exceptions=True)
            await ar.aclose()

    async def _warm_up(self, ar: Any) -> None:
        """Pay the first-time costs (the CA bundle, anyio's backend, httpx's client, the connection to
        Redis) before any lock is held: on a busy host they stalled the loop past a short lock TTL, and
        a lapsed lock means a second dispatcher posts the same event."""
        import anyio

        _ssl_context()
        await anyio.sleep(0)
        async with httpx.AsyncClient(verify=_ssl_context(), trust_env=False):
            pass
        with contextlib.suppress(redis.RedisError):
            await ar.ping()

    async def _turn(self, ar: Any, fenced: Any) -> None:
        policy = self.outbox.policy
        if len(self.active) >= policy.max_inflight:
            return
        now = time.time()
        due = [_text(j) for j in await ar.zrangebyscore(DUE_KEY, 0, now, start=0, num=self.scan)]
        jobs = [j for j in due if j not in self.active]
        if not jobs:
            return
        async with ar.pipeline(transaction=False) as pipe:
            for j in jobs:
                pipe.lindex(QUEUE_PREFIX + j, 0)
            heads = await pipe.execute()
        busy: dict[str, float] = {}
        for job_id, head in zip(jobs, heads, strict=True):
            if len(self.active) >= policy.max_inflight:
                break
            host = _host(head) if head is not None else ""
            if host and self.per_host[host] >= policy.per_host:
                busy[job_id] = now + policy.host_busy_wait_s
                continue
            self.per_host[host] += 1
            self.active[job_id] = asyncio.create_task(self._run_job(ar, fenced, job_id, host))
        if busy and len(due) >= self.scan:
            # the whole window was due jobs: those of full hosts step back a little, so that the next
            # scans reach the jobs of other hosts (a smaller window saw every due job: nothing to do)
            await ar.zadd(DUE_KEY, busy, xx=True, gt=True)  # type: ignore[arg-type]

    async def _run_job(self, ar: Any, fenced: Any, job_id: str, host: str) -> int:
        delivered = 0
        try:
            delivered = await self.outbox.deliver_job(ar, fenced, job_id)
            return delivered
        except redis.RedisError as e:
            log.warning("callback_dispatcher_redis_error", job_id=job_id, error=str(e))
            return 0
        except Exception:
            log.exception("callback_dispatcher_error", job_id=job_id)
            return 0
        finally:
            self.active.pop(job_id, None)
            self.per_host[host] -= 1
            if self.per_host[host] <= 0:
                del self.per_host[host]
            # a slot freed by a delivery is reused at once; not one freed by a job another dispatcher holds
            # (that would spin on its lock) nor by a failure (its job waits for the schedule anyway)
            if delivered and self._wake is not None:
                self._wake.set()
