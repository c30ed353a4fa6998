"""Job events: the one builder of every event a job emits (progress milestones and the final).

Every state change that the backend hears about goes through one Redis script
(``EMIT_LUA``) that, in a single atomic step:

* moves the job record (a milestone: progress forward; a terminal transition:
  ``completed`` or ``failed``, at most once per run);
* builds the event's JSON payload *from the record as it now stands* (so the
  final event always says what the record says: a job cancelled during merge
  reports ``failed/CANCELLED``, never ``completed``);
* appends it to the job's event log (Redis Stream ``ecg:job:{job_id}:events``,
  fields ``event_id`` and ``payload``, trimmed to ~1000 entries, expiring with
  the record);
* and, when the job has a ``callback_url``, to its callback outbox.

A crash can therefore never leave a terminal job without its final event, nor a
final event without the terminal state. The final event's id is
``{job_id}:final:{run}``: ``run`` is 1 for the first run and grows by one on
each operator requeue, so a backend that de-duplicates on the id still gets a
requeued job's new result.
"""

from __future__ import annotations

import json
import time
import uuid
from enum import StrEnum
from typing import Any

import redis
import redis.asyncio

from ecg_audio import event_log, keys
from ecg_audio.callbacks import DUE_KEY, QUEUE_PREFIX
from ecg_audio.queues import WAITING_PREFIX


class JobStatus(StrEnum):
    """The one status type: what a job record's ``status`` holds."""

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL: frozenset[str] = frozenset({JobStatus.COMPLETED, JobStatus.FAILED})


def is_terminal(status: str | None) -> bool:
    return status in TERMINAL


def lua_with_statuses(script: str, **constants: str) -> str:
    """``script`` after a generated header that defines the status names as Lua locals (``QUEUED`` ..
    ``FAILED``, and the set ``TERMINAL``) and each of ``constants`` (a key prefix, say): the Redis
    scripts never spell a status or a key name of their own."""
    values = {s.name: s.value for s in JobStatus} | constants
    names = "".join(f"local {name} = {json.dumps(value)}\n" for name, value in values.items())
    terminal = ", ".join(f"[{s.name}] = true" for s in JobStatus if s.terminal)
    return f"{names}local TERMINAL = {{{terminal}}}\n{script}"


RECORD_PREFIX = keys.JOB
OUTBOX_PREFIX = QUEUE_PREFIX  # the callback outbox's keys, as ecg_audio.callbacks delivers from them
FAILED_SET = keys.JOBS_FAILED
EVENT_LOG_MAXLEN = event_log.MAXLEN
event_log_key = event_log.key  # the per-job event log the shim streams from


def final_event_id(job_id: str, run: int) -> str:
    return f"{job_id}:final:{run}"


# KEYS: 1 record, 2 outbox list, 3 due index, 4 event log stream, 5 failed index (dead-letter list)
# ARGV: 1 mode ('progress' | 'terminal'), 2 now, 3 ttl, 4 event id suffix (progress), 5 status,
#       6 progress ('' keep), 7 stage, 8 message, 9 error_code, 10 error_message,
#       11 result JSON ('' none), 12 event log maxlen, 13 run the caller belongs to ('' any)
# Returns {code, event_id}: 1 emitted (with the transition); 2 the job was already finished and this
# run had no final event yet: the one its record calls for was emitted; 0 no record; -1 nothing to do
# (finished, its final already out);
# -2 the caller's run is not the record's (a requeue started a new one).
EMIT_LUA = lua_with_statuses("""
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then return {0, ''} end
local T = TERMINAL
local status = redis.call('HGET', key, 'status')
local run = redis.call('HGET', key, 'run') or '1'
local job = redis.call('HGET', key, 'job_id')
local now = ARGV[2]
local code = 1
local eid
if ARGV[1] == 'progress' then
  if T[status] then return {-1, ''} end
  local old = tonumber(redis.call('HGET', key, 'progress') or '0') or 0
  local new = tonumber(ARGV[6])
  if new ~= nil and new > old then redis.call('HSET', key, 'progress', ARGV[6]) end
  redis.call('HSET', key, 'status', ARGV[5], 'stage', ARGV[7], 'message', ARGV[8], 'updated_at', now)
  eid = job .. ':' .. ARGV[4]
else
  if ARGV[13] ~= '' and ARGV[13] ~= run then return {-2, ''} end
  eid = job .. ':final:' .. run
  if T[status] then
    -- finished already: its final event is out unless whoever finished it did not emit one
    if redis.call('HGET', key, 'final_event_id') == eid then return {-1, eid} end
    code = 2
  else
    local old = tonumber(redis.call('HGET', key, 'progress') or '0') or 0
    local new = tonumber(ARGV[6])
    if new ~= nil and new > old then redis.call('HSET', key, 'progress', ARGV[6]) end
    redis.call('HSET', key, 'status', ARGV[5], 'stage', ARGV[7], 'message', ARGV[8],
               'error_code', ARGV[9], 'error_message', ARGV[10], 'updated_at', now)
    if ARGV[5] == FAILED then redis.call('ZADD', KEYS[5], now, job) end
  end
  redis.call('HSET', key, 'final_event_id', eid)
end
if status == QUEUED then
  -- taken (or ended) while waiting: it leaves the waiting line that queue positions are read from
  local q = redis.call('HGET', key, 'queue_key')
  if q then redis.call('ZREM', WAITING_PREFIX .. q, job) end
end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', key, ttl)
  -- the dead-letter index keeps what the records keep (Redis runs noeviction)
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', tonumber(now) - ttl)
end
-- the one event builder: every payload from the record as it now stands
local h = {}
local flat = redis.call('HGETALL', key)
for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
local function str(v) if v == nil or v == '' then return 'null' end return cjson.encode(v) end
local result = 'null'
if ARGV[1] ~= 'progress' and h['status'] == COMPLETED and ARGV[11] ~= '' then result = ARGV[11] end
local body = '{"event_id":' .. cjson.encode(eid) .. ',"job_id":' .. cjson.encode(job)
  .. ',"status":' .. cjson.encode(h['status']) .. ',"progress":' .. string.format('%d', tonumber(h['progress']) or 0)
  .. ',"message":' .. cjson.encode(h['message'] or '') .. ',"stage":' .. str(h['stage'])
  .. ',"result":' .. result .. ',"error_code":' .. str(h['error_code'])
  .. ',"error_message":' .. str(h['error_message']) .. '}'
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[12], '*', 'event_id', eid, 'payload', body)
if ttl > 0 then redis.call('EXPIRE', KEYS[4], ttl) end
local url = nil
local ok, req = pcall(cjson.decode, h['request'] or '{}')
if ok and type(req) == 'table' and type(req['callback_url']) == 'string' and req['callback_url'] ~= '' then
  url = req['callback_url']
end
if url then
  -- the owner (an API key's fingerprint) picks the secret that signs it (ecg_audio.webhook_secrets)
  redis.call('RPUSH', KEYS[2], '{"event_id":' .. cjson.encode(eid) .. ',"url":' .. cjson.encode(url)
    .. ',"owner":' .. cjson.encode(h['owner'] or '') .. ',"attempts":0,"payload":' .. body .. '}')
  redis.call('ZADD', KEYS[3], 'NX', now, job)
end
return {code, eid}
""", WAITING_PREFIX=WAITING_PREFIX)


def _emit_call(
    job_id: str,
    mode: str,
    ttl_s: int,
    *,
    status: str,
    progress: int | None,
    stage: str | None,
    message: str,
    error_code: str | None = None,
    error_message: str | None = None,
    result: dict[str, Any] | None = None,
    run: int | None = None,
) -> tuple[list[str], list[str]]:
    """``EMIT_LUA``'s keys and arguments."""
    keys = [RECORD_PREFIX + job_id, OUTBOX_PREFIX + job_id, DUE_KEY, event_log_key(job_id), FAILED_SET]
    args = [
        mode,
        repr(time.time()),
        str(int(ttl_s)),
        uuid.uuid4().hex[:12],
        str(status),
        "" if progress is None else str(int(progress)),
        stage or "",
        message,
        error_code or "",
        error_message or "",
        "" if result is None else json.dumps(result, ensure_ascii=False),
        str(EVENT_LOG_MAXLEN),
        "" if run is None else str(int(run)),
    ]
    return keys, args


def _emit_reply(reply: Any) -> tuple[int, str]:
    code, eid = reply
    return int(code), eid.decode() if isinstance(eid, bytes) else str(eid)


class JobEvents:
    """Emits a job's events through ``EMIT_LUA`` (see the module docstring)."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.r = client
        self.ttl_s = ttl_s
        self._emit = client.register_script(EMIT_LUA)

    def _call(self, job_id: str, mode: str, **fields: Any) -> tuple[int, str]:
        keys, args = _emit_call(job_id, mode, self.ttl_s, **fields)
        return _emit_reply(self._emit(keys=keys, args=args))

    def progress(self, job_id: str, *, progress: int, stage: str, message: str) -> bool:
        """A milestone: False when the job is unknown or already finished (nothing emitted)."""
        code, _ = self._call(
            job_id, "progress", status=JobStatus.PROCESSING, progress=progress, stage=stage, message=message
        )
        return code == 1

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        stage: str | None,
        message: str,
        progress: int | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
        result: dict[str, Any] | None = None,
        run: int | None = None,
    ) -> tuple[int, str]:
        """The terminal transition and its final event, in one step (code 1). On a job that is already
        finished, emits the final event that the record's own state calls for if this run has none
        yet (code 2), else nothing (code -1)."""
        if not status.terminal:
            raise ValueError(f"{status} is not a terminal status")
        return self._call(
            job_id,
            "terminal",
            status=status,
            progress=progress,
            stage=stage,
            message=message,
            error_code=error_code,
            error_message=error_message,
            result=result,
            run=run,
        )


class AsyncJobEvents:
    """``JobEvents.finish`` on a ``redis.asyncio`` client: the shim's event streams, which write the
    final event a finished job's record calls for when its log has none (the same script, once)."""

    def __init__(self, client: redis.asyncio.Redis, ttl_s: int) -> None:
        self.ttl_s = ttl_s
        self._emit = client.register_script(EMIT_LUA)

    async def finish(self, job_id: str, status: JobStatus, **fields: Any) -> tuple[int, str]:
        if not status.terminal:
            raise ValueError(f"{status} is not a terminal status")
        keys, args = _emit_call(job_id, "terminal", self.ttl_s, status=status, **fields)
        return _emit_reply(await self._emit(keys=keys, args=args))
