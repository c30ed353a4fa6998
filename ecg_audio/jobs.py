"""Job records in Redis: the one view of a job that the shim, the workers and the CLI share.

A job's record is a hash ``ecg:job:{job_id}``. Creating it is atomic (HSETNX on
``job_id``), which is what makes ``POST`` idempotent: the same ``job_id`` posted
twice finds the record and enqueues nothing. Progress only moves forward and a
finished job stays finished; both rules are enforced inside Redis (Lua), so
a late or redelivered update cannot rewind what the backend already saw.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis

PREFIX = "ecg:job:"
RESULT_PREFIX = "ecg:result:"
FAILED_SET = "ecg:jobs:failed"
ALL_SET = "ecg:jobs:all"

TERMINAL = ("completed", "failed")

_UPDATE_LUA = """
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then return 0 end
local status = redis.call('HGET', key, 'status')
if status == 'completed' or status == 'failed' then
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
"""


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

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> JobRecord:
        return cls(
            job_id=h["job_id"],
            status=h.get("status", "queued"),
            progress=int(float(h.get("progress", 0))),
            message=h.get("message", ""),
            stage=h.get("stage") or None,
            error_code=h.get("error_code") or None,
            error_message=h.get("error_message") or None,
            created_at=float(h.get("created_at", 0)),
            updated_at=float(h.get("updated_at", 0)),
            request=json.loads(h.get("request", "{}")),
            attempts=int(h.get("attempts", 0)),
        )


class JobStore:
    def __init__(self, client: redis.Redis, ttl_s: int = 7 * 24 * 3600) -> None:
        self.r = client
        self.ttl_s = ttl_s
        self._update = self.r.register_script(_UPDATE_LUA)

    @classmethod
    def from_url(cls, url: str, ttl_s: int = 7 * 24 * 3600) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), ttl_s)

    def create(self, job_id: str, request: dict[str, Any]) -> bool:
        """Create the record; False when a job with this id already exists (nothing is changed)."""
        key = PREFIX + job_id
        now = time.time()
        if not self.r.hsetnx(key, "job_id", job_id):
            return False
        pipe = self.r.pipeline()
        pipe.hset(
            key,
            mapping={
                "status": "queued",
                "progress": 0,
                "message": "Queued",
                "created_at": now,
                "updated_at": now,
                "request": json.dumps(request),
                "attempts": 0,
            },
        )
        pipe.expire(key, self.ttl_s)
        pipe.zadd(ALL_SET, {job_id: now})
        pipe.execute()
        return True

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

    def mark_failed(self, job_id: str, code: str, message: str, stage: str | None) -> bool:
        changed = self.update(
            job_id,
            status="failed",
            error_code=code,
            error_message=message,
            stage=stage or "",
            message=f"Failed: {message}",
        )
        if changed:
            self.r.zadd(FAILED_SET, {job_id: time.time()})
        return changed

    def requeue(self, job_id: str) -> bool:
        """Reopen a failed job (operator action). Progress is kept; the error is cleared."""
        ok = self.update(
            job_id, status="queued", force=True, error_code="", error_message="", message="Requeued by operator"
        )
        if ok:
            self.r.zrem(FAILED_SET, job_id)
        return ok

    def failed_ids(self, limit: int = 100) -> list[str]:
        return list(self.r.zrevrange(FAILED_SET, 0, limit - 1))  # type: ignore[arg-type]

    def incr_attempts(self, job_id: str) -> int:
        return int(self.r.hincrby(PREFIX + job_id, "attempts", 1))  # type: ignore[arg-type]
