"""Per-API-key limits in front of GPU work: a submission rate and a cap on unfinished jobs.

Both live in Redis, checked and updated by one Lua script, so every shim process and
every shim machine shares them. Past either limit a submission gets 429 with
``Retry-After``:

- rate: at most ``submit_rate_per_key`` submissions in any ``submit_rate_window_s``
  (a sliding log: a sorted set of admission times per key). ``Retry-After`` is when the
  oldest one leaves the window;
- queue: at most ``queued_jobs_per_key`` jobs of the key that have not finished
  (a sorted set of job ids per key). Jobs that completed or failed, and ids whose
  record never appeared (a submission refused after admission), are pruned before
  each check. ``Retry-After`` is ``queue_retry_after_s``: when a job ends is unknown.

A re-POST of a job id the key already has is idempotent (200 with its state) and is
answered before the limits are asked (``api_shim.submission.submit``): a backend retrying a
POST whose answer it lost uses neither its rate nor its cap. Routes that store an upload
ask ``check_rate`` first, so a key past its rate stores nothing. Keys are identified by a
hash, never stored in clear. 0 disables a limit.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio
import structlog

from api_shim.errors import ApiError
from ecg_audio import keys
from ecg_audio.jobs import PREFIX as JOB_PREFIX
from ecg_audio.jobs import TERMINAL
from ecg_audio.settings import Settings

log = structlog.get_logger(__name__)

RATE_PREFIX = keys.LIMIT_RATE
QUEUED_PREFIX = keys.LIMIT_QUEUED
# an admitted id whose record does not exist yet may be a submission still in flight
_MISSING_GRACE_S = 60.0

# KEYS: rate zset, queued zset. ARGV: now_ms, window_ms, rate, cap, job_id, ttl_ms, nonce, pruned ids...
# Returns {0, 0} admitted, {1, retry_ms} rate exceeded, {2, 0} queue cap reached.
_ADMIT = """
local now, window, rate, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local job, ttl, nonce = ARGV[5], tonumber(ARGV[6]), ARGV[7]
for i = 8, #ARGV do redis.call('ZREM', KEYS[2], ARGV[i]) end
if rate > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  if redis.call('ZCARD', KEYS[1]) >= rate then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {1, tonumber(oldest[2]) + window - now}
  end
end
local known = redis.call('ZSCORE', KEYS[2], job)
if cap > 0 and not known and redis.call('ZCARD', KEYS[2]) >= cap then
  return {2, 0}
end
if rate > 0 then
  redis.call('ZADD', KEYS[1], now, now .. ':' .. nonce)
  redis.call('PEXPIRE', KEYS[1], window)
end
if cap > 0 and not known then
  redis.call('ZADD', KEYS[2], now, job)
end
if cap > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return {0, 0}
"""


@dataclass(frozen=True)
class Limits:
    rate: int
    window_s: float
    queued: int
    queue_retry_after_s: int
    job_ttl_s: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            settings.submit_rate_per_key,
            settings.submit_rate_window_s,
            settings.queued_jobs_per_key,
            settings.queue_retry_after_s,
            settings.job_ttl_s,
        )

    @property
    def enabled(self) -> bool:
        return self.rate > 0 or self.queued > 0


def key_id(api_key: str) -> str:
    """The key's name in Redis and in logs: a hash, so neither ever holds the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:24]


class SubmissionLimiter:
    """Admits a submission or raises 429; ``status_of(job_id)`` reads a job's status (None if unknown)."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        limits: Limits,
        status_of: Callable[[list[str]], Awaitable[list[str | None]]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._r = client
        self.limits = limits
        self._status_of = status_of
        self._clock = clock
        self._script = client.register_script(_ADMIT)

    async def admit(self, api_key: str, job_id: str) -> None:
        kid = key_id(api_key)
        queued_key = QUEUED_PREFIX + kid
        now = self._clock()
        pruned: list[str] = []
        if self.limits.queued > 0:
            admitted = cast(list[tuple[Any, float]], await self._r.zrange(queued_key, 0, -1, withscores=True))
            ids = [m.decode() if isinstance(m, bytes) else str(m) for m, _ in admitted]
            statuses = await self._status_of(ids) if ids else []
            for (_, at), job, status in zip(admitted, ids, statuses, strict=True):
                if status in TERMINAL or (status is None and now - float(at) / 1000 > _MISSING_GRACE_S):
                    pruned.append(job)
        verdict, retry_ms = await self._script(
            keys=[RATE_PREFIX + kid, queued_key],
            args=[
                int(now * 1000),
                int(self.limits.window_s * 1000),
                self.limits.rate,
                self.limits.queued,
                job_id,
                self.limits.job_ttl_s * 1000,
                uuid.uuid4().hex,
                *pruned,
            ],
        )
        if int(verdict) == 1:
            self._rate_limited(kid, int(retry_ms))
        if int(verdict) == 2:
            log.info("submission_queue_capped", key=kid, cap=self.limits.queued)
            raise ApiError(
                429,
                "TOO_MANY_UNFINISHED_JOBS",
                f"this API key already has {self.limits.queued} unfinished jobs; retry when some have finished",
                headers={"Retry-After": str(self.limits.queue_retry_after_s)},
            )

    async def check_rate(self, api_key: str) -> None:
        """429 when the key's rate window is full; uses none of it (a peek, before an upload is stored)."""
        if self.limits.rate <= 0:
            return
        kid = key_id(api_key)
        now_ms = int(self._clock() * 1000)
        window_ms = int(self.limits.window_s * 1000)
        pipe = self._r.pipeline(transaction=False)
        pipe.zcount(RATE_PREFIX + kid, now_ms - window_ms + 1, "+inf")
        pipe.zrangebyscore(RATE_PREFIX + kid, now_ms - window_ms + 1, "+inf", start=0, num=1, withscores=True)
        used, oldest = await pipe.execute()
        if int(used) >= self.limits.rate and oldest:
            self._rate_limited(kid, int(float(oldest[0][1])) + window_ms - now_ms)

    def _rate_limited(self, kid: str, retry_ms: int) -> None:
        retry_after = max(1, -(-retry_ms // 1000))  # whole seconds, rounded up
        log.info("submission_rate_limited", key=kid, retry_after_s=retry_after)
        raise ApiError(
            429,
            "RATE_LIMITED",
            f"more than {self.limits.rate} submissions in {self.limits.window_s:g} s for this API key",
            headers={"Retry-After": str(retry_after)},
        )


def limiter_for(client: redis.asyncio.Redis, limits: Limits) -> SubmissionLimiter:
    """A limiter on the shim's async Redis client; job statuses are read from the job records."""

    async def status_of(job_ids: list[str]) -> list[str | None]:
        pipe = client.pipeline(transaction=False)
        for job in job_ids:
            pipe.hget(JOB_PREFIX + job, "status")
        raw = await pipe.execute()
        return [v.decode() if isinstance(v, bytes) else v for v in raw]

    return SubmissionLimiter(client, limits, status_of)


__all__ = ["Limits", "SubmissionLimiter", "key_id", "limiter_for"]
