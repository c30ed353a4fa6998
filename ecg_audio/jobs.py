"""Job records in Redis: the one view of a job that the shim, the workers and the CLI share.

A job's record is a hash ``ecg:job:{job_id}``. Creating it is one Redis script that
creates the record only if it has no ``job_id`` yet and, in the same step, can push the
job's first message (``ecg_audio.chain.ChainMessage``): that is what makes ``POST``
idempotent (the same ``job_id`` posted twice finds the record and enqueues nothing), and
a record never exists without its message nor a message without its record. Progress only moves forward and a
finished job stays finished; both rules are enforced inside Redis (Lua), so
a late or redelivered update cannot rewind what the backend already saw.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio

from ecg_audio import event_log, keys
from ecg_audio.callbacks import DEAD_PREFIX, DUE_KEY, LOCK_PREFIX
from ecg_audio.callbacks import QUEUE_PREFIX as OUTBOX_PREFIX

# the one status type lives with the event builder (the final event and the terminal state are
# written together there)
from ecg_audio.job_events import (
    FAILED_SET,
    TERMINAL,
    AsyncJobEvents,
    JobEvents,
    JobStatus,
    is_terminal,
    lua_with_statuses,
)
from ecg_audio.messages import text
from ecg_audio.queues import WAITING_PREFIX, WAITING_SEQ

if TYPE_CHECKING:
    from ecg_audio.chain import ChainMessage

PREFIX = keys.JOB
RESULT_PREFIX = keys.RESULT
ALL_SET = keys.JOBS_ALL

__all__ = ["TERMINAL", "JobStatus", "is_terminal", "JobRecord", "JobStore", "AsyncJobStore"]

_UPDATE_LUA = lua_with_statuses("""
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then return 0 end
local status = redis.call('HGET', key, 'status')
if TERMINAL[status] then
  if ARGV[5] ~= '1' then return -1 end
end
local old = tonumber(redis.call('HGET', key, 'progress') or '0')
local new = tonumber(ARGV[2])
if new ~= nil and new > old then redis.call('HSET', key, 'progress', ARGV[2]) end
if ARGV[1] ~= '' then redis.call('HSET', key, 'status', ARGV[1]) end
for i = 6, #ARGV, 2 do redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
redis.call('HSET', key, 'updated_at', ARGV[3])
if tonumber(ARGV[4]) > 0 then redis.call('EXPIRE', key, ARGV[4]) end
return 1
""")

OWNER_PREFIX = keys.JOBS_OWNER
RETIRED_RUNS = keys.JOBS_RETIRED_RUNS

# KEYS: the record, the index of all jobs[, the queue list]
# ARGV: job_id, now, request JSON, ttl, message ('' = none), task-sent event ('' = none), event channel,
#       owner (a fingerprint of the API key that created the job; '' = none), the message's task id
# An existing record is returned whole (HGETALL), so a repeated POST needs no second round trip.
# The message is pushed before anything else is written: should that fail (OOM, a wrong type), the
# script has written nothing. An owned job is also indexed per owner (OWNER_PREFIX), newest last,
# entries older than the TTL trimmed on the way.
_CREATE_LUA = lua_with_statuses(
    """
local key = KEYS[1]
if redis.call('HEXISTS', key, 'job_id') == 1 then return redis.call('HGETALL', key) end
if ARGV[5] ~= '' then
  redis.call('LPUSH', KEYS[3], ARGV[5])
  redis.call('HSET', key, 'queue_key', KEYS[3], 'queue_task_id', ARGV[9])
  -- in the waiting line the shim reads queue positions from (ecg_audio.queues.WAITING_PREFIX)
  redis.call('ZADD', WAITING_PREFIX .. KEYS[3], redis.call('INCR', WAITING_SEQ), ARGV[1])
end
redis.call('HSET', key, 'job_id', ARGV[1], 'status', QUEUED, 'progress', '0', 'message', QUEUED_MESSAGE,
           'created_at', ARGV[2], 'updated_at', ARGV[2], 'request', ARGV[3], 'attempts', '0')
-- an id purged before: its runs go on from the last one, so that no event id of the earlier job
-- (its final is '{job_id}:final:{run}') is ever used again
local retired = tonumber(redis.call('HGET', RETIRED_RUNS, ARGV[1]) or '0') or 0
if retired > 0 then redis.call('HSET', key, 'run', retired + 1, 'first_run', retired + 1) end
redis.call('EXPIRE', key, ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
-- the all-jobs index keeps what the records keep (Redis runs noeviction)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[2]) - tonumber(ARGV[4]))
if ARGV[8] ~= '' then
  local index = OWNER_PREFIX .. ARGV[8]
  redis.call('HSET', key, 'owner', ARGV[8])
  redis.call('ZADD', index, ARGV[2], ARGV[1])
  redis.call('ZREMRANGEBYSCORE', index, '-inf', '(' .. (tonumber(ARGV[2]) - tonumber(ARGV[4])))
  redis.call('EXPIRE', index, ARGV[4])
end
if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[7], ARGV[6]) end
return 1
""",
    OWNER_PREFIX=OWNER_PREFIX,
    QUEUED_MESSAGE=text("job.queued", "en"),
    WAITING_PREFIX=WAITING_PREFIX,
    WAITING_SEQ=WAITING_SEQ,
    RETIRED_RUNS=RETIRED_RUNS,
)


# KEYS: record, failed index, result. ARGV: force, now, ttl. Returns the new run, 0 unknown, -1 not finished.
# The stored result goes: a new run computes its own (a forced requeue of a completed job recomputes
# instead of reporting the old result at once).
_REQUEUE_LUA = lua_with_statuses(
    """
local key = KEYS[1]
if redis.call('HEXISTS', key, 'job_id') == 0 then return 0 end
local status = redis.call('HGET', key, 'status')
if ARGV[1] ~= '1' and not TERMINAL[status] then return -1 end
local run = (tonumber(redis.call('HGET', key, 'run') or '1') or 1) + 1
local fields = redis.call('HKEYS', key)
for _, f in ipairs(fields) do
  local p = string.sub(f, 1, 11)
  if p == 'deliveries:' or p == 'netretries:' or string.sub(f, 1, 8) == 'started:'
     or string.sub(f, 1, 10) == 'published:' or string.sub(f, 1, 9) == 'delivery:' then
    redis.call('HDEL', key, f)
  end
end
redis.call('HSET', key, 'status', QUEUED, 'error_code', '', 'error_message', '',
           'message', REQUEUED_MESSAGE, 'run', run, 'updated_at', ARGV[2])
redis.call('EXPIRE', key, ARGV[3])
redis.call('ZREM', KEYS[2], redis.call('HGET', key, 'job_id'))
redis.call('DEL', KEYS[3])
return run
""",
    REQUEUED_MESSAGE=text("job.requeued", "en"),
)


# KEYS: record, all-jobs index, failed index, result, event log, callback outbox, dead letters, callback
# lock, callbacks due index, retired runs. ARGV: job_id, owner index prefix. Returns 1, or 0 without a record.
_PURGE_LUA = """
local existed = 0
local h = redis.call('HMGET', KEYS[1], 'job_id', 'owner', 'run')
if h[1] then
  existed = 1
  if h[2] and h[2] ~= '' then redis.call('ZREM', ARGV[2] .. h[2], ARGV[1]) end
  local run = tonumber(h[3] or '1') or 1
  local retired = tonumber(redis.call('HGET', KEYS[10], ARGV[1]) or '0') or 0
  if run > retired then redis.call('HSET', KEYS[10], ARGV[1], run) end
end
redis.call('DEL', KEYS[1], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[9], ARGV[1])
return existed
"""


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _create_call(
    job_id: str, request: dict[str, Any], ttl_s: int, message: ChainMessage | None, owner: str | None = None
) -> tuple[list[str], list[str]]:
    now = repr(time.time())  # as redis-py writes a float
    keys = [PREFIX + job_id, ALL_SET]
    args = [job_id, now, json.dumps(request), str(int(ttl_s)), "", "", "", owner or "", ""]
    if message is not None:
        keys.append(message.queue_key)
        args[4:7] = [message.message, message.event, message.event_channel]
        args[8] = message.task_id
    return keys, args


def _create_reply(reply: Any) -> tuple[bool, JobRecord | None]:
    if not isinstance(reply, list):
        return True, None
    flat = [v.decode() if isinstance(v, bytes) else str(v) for v in reply]
    return False, JobRecord.from_hash(dict(zip(flat[::2], flat[1::2], strict=True)))


@dataclass
class JobRecord:
    job_id: str
    status: str
    progress: int = 0
    message: str = ""
    stage: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    request: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    owner: str | None = None  # fingerprint of the API key that created the job (the shim's tenancy)
    queue_key: str | None = None  # where the first message was pushed, and its task id (queue position)
    queue_task_id: str | None = None
    duration: float | None = None  # the audio's length in seconds, once the ingest stage knows it
    run: int = 1  # 1, then one more per operator requeue; the final event's id names it
    first_run: int = 1  # more than 1 for a job re-created under the id of a purged one (view links name it)

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> JobRecord:
        return cls(
            job_id=h["job_id"],
            status=h.get("status", JobStatus.QUEUED),
            progress=int(float(h.get("progress", 0))),
            message=h.get("message", ""),
            stage=h.get("stage") or None,
            error_code=h.get("error_code") or None,
            error_message=h.get("error_message") or None,
            created_at=float(h.get("created_at", 0)),
            updated_at=float(h.get("updated_at", 0)),
            request=json.loads(h.get("request", "{}")),
            attempts=int(h.get("attempts", 0)),
            owner=h.get("owner") or None,
            queue_key=h.get("queue_key") or None,
            queue_task_id=h.get("queue_task_id") or None,
            duration=float(h["duration"]) if h.get("duration") else None,
            run=int(h.get("run") or 1),
            first_run=int(h.get("first_run") or 1),
        )


class JobStore:
    def __init__(self, client: redis.Redis, ttl_s: int = 7 * 24 * 3600) -> None:
        self.r = client
        self.ttl_s = ttl_s
        self._update = self.r.register_script(_UPDATE_LUA)
        self._create = self.r.register_script(_CREATE_LUA)
        self._requeue = self.r.register_script(_REQUEUE_LUA)
        self._purge = self.r.register_script(_PURGE_LUA)
        self.events = JobEvents(client, ttl_s)

    @classmethod
    def from_url(cls, url: str, ttl_s: int = 7 * 24 * 3600) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), ttl_s)

    def create(self, job_id: str, request: dict[str, Any], *, message: ChainMessage | None = None) -> bool:
        """Create the record (and push ``message``); False when a job with this id already exists
        (nothing is changed, nothing is pushed)."""
        return self.create_or_get(job_id, request, message=message)[0]

    def create_or_get(
        self, job_id: str, request: dict[str, Any], *, message: ChainMessage | None = None, owner: str | None = None
    ) -> tuple[bool, JobRecord | None]:
        """``(True, None)`` when created (and ``message`` pushed), else ``(False, the existing record)``."""
        keys, args = _create_call(job_id, request, self.ttl_s, message, owner)
        return _create_reply(self._create(keys=keys, args=args))

    def get(self, job_id: str) -> JobRecord | None:
        h = self.r.hgetall(PREFIX + job_id)
        return JobRecord.from_hash(h) if h else None  # type: ignore[arg-type]

    def update(
        self,
        job_id: str,
        *,
        status: str | None = None,
        progress: int | None = None,
        force: bool = False,
        **fields: Any,
    ) -> bool:
        """Move a job forward. Returns False when the job is unknown or already finished."""
        args: list[Any] = [status or "", "" if progress is None else int(progress), time.time(), self.ttl_s]
        args.append("1" if force else "0")
        for k, v in fields.items():
            args += [k, "" if v is None else (json.dumps(v) if isinstance(v, dict | list) else v)]
        return int(self._update(keys=[PREFIX + job_id], args=args)) == 1  # type: ignore[arg-type]

    def set_result(self, job_id: str, result: dict[str, Any]) -> None:
        self.r.set(RESULT_PREFIX + job_id, json.dumps(result, ensure_ascii=False), ex=self.ttl_s)

    def get_result(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.get(RESULT_PREFIX + job_id)
        return json.loads(raw) if raw else None  # type: ignore[arg-type]

    def mark_failed(
        self,
        job_id: str,
        code: str,
        message: str,
        stage: str | None,
        *,
        run: int | None = None,
        summary: str | None = None,
    ) -> bool:
        """Fail the job and emit its final event, in one step (``JobEvents.finish``). False when the job
        is unknown or already finished. ``summary``: the record's message in the job's locale
        (default ``Failed: <message>``)."""
        rc, _ = self.events.finish(
            job_id,
            JobStatus.FAILED,
            stage=stage,
            message=summary or text("job.failed", "en", error=message),
            error_code=code,
            error_message=message,
            run=run,
        )
        return rc == 1

    def requeue(self, job_id: str, *, force: bool = False) -> int | None:
        """Reopen a finished job (operator action) as a new run: progress is kept; the error, the
        per-stage delivery counts and the stored result are cleared. Returns the new run number, or
        None when the job is unknown or (without ``force``) not finished: a running job would get a
        second chain."""
        names = [PREFIX + job_id, FAILED_SET, RESULT_PREFIX + job_id]
        r = self._requeue(keys=names, args=["1" if force else "0", time.time(), self.ttl_s])
        n = int(r)  # type: ignore[arg-type]
        return n if n > 0 else None

    def purge(self, job_id: str) -> bool:
        """Forget a job and everything it owns in Redis: record, result, event log, callback outbox
        and dead letters, index entries (all jobs, failed, owner, due callbacks), stage leases, fault
        counters, Celery's task results. Its last run is retired (``RETIRED_RUNS``) so that a job
        re-created under this id starts after it. False when there was no record."""
        from ecg_audio.stage_table import STAGE_NAMES

        names = [PREFIX + job_id, ALL_SET, FAILED_SET, RESULT_PREFIX + job_id, event_log.key(job_id)]
        names += [OUTBOX_PREFIX + job_id, DEAD_PREFIX + job_id, LOCK_PREFIX + job_id, DUE_KEY, RETIRED_RUNS]
        existed = int(self._purge(keys=names, args=[job_id, OWNER_PREFIX])) == 1  # type: ignore[arg-type]
        owned = [f"{keys.LEASE}{job_id}:{stage}" for stage in STAGE_NAMES]
        owned += [f"{keys.FAULT}{job_id}:{point}" for point in (*STAGE_NAMES, "before_final")]
        owned.append(keys.JOB_VOICES + job_id)  # its speakers' voiceprints (speakers by name)
        # task ids are '{job_id}:{stage}:{nonce}' (ecg_audio.chain.task_ids)
        owned += list(self.r.scan_iter(match=f"celery-task-meta-{_glob_escape(job_id)}:*", count=1000))
        self.r.delete(*owned)
        return existed

    def failed_ids(self, limit: int = 100) -> list[str]:
        return list(self.r.zrevrange(FAILED_SET, 0, limit - 1))  # type: ignore[arg-type]

    def incr_attempts(self, job_id: str) -> int:
        return int(self.r.hincrby(PREFIX + job_id, "attempts", 1))  # type: ignore[arg-type]


class AsyncJobStore:
    """What the shim's async submission path needs of ``JobStore``, on a ``redis.asyncio`` client."""

    def __init__(self, client: redis.asyncio.Redis, ttl_s: int = 7 * 24 * 3600) -> None:
        self.r = client
        self.ttl_s = ttl_s
        self._create = self.r.register_script(_CREATE_LUA)
        self.events = AsyncJobEvents(client, ttl_s)

    async def create_or_get(
        self, job_id: str, request: dict[str, Any], *, message: ChainMessage | None = None, owner: str | None = None
    ) -> tuple[bool, JobRecord | None]:
        keys, args = _create_call(job_id, request, self.ttl_s, message, owner)
        return _create_reply(await self._create(keys=keys, args=args))

    async def get(self, job_id: str) -> JobRecord | None:
        h = await self.r.hgetall(PREFIX + job_id)
        return JobRecord.from_hash(_decoded(h)) if h else None

    async def get_result(self, job_id: str) -> dict[str, Any] | None:
        raw = await self.r.get(RESULT_PREFIX + job_id)
        return json.loads(raw) if raw else None  # type: ignore[no-any-return]


def _decoded(h: dict[Any, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in h.items()
    }
