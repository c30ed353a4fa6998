"""How many event streams (SSE and WebSocket) one API key holds open, across every shim process.

Each open stream holds a slot: a member of the sorted set ``ecg:streams:{key id}`` scored by
when its lease ends. A stream renews its lease at every keep-alive and gives the slot back when
it ends; a shim process that dies leaves slots that lapse within ``lease_s``. Past
``ECG_MAX_STREAMS_PER_KEY`` open streams a new one is refused (429 with Retry-After): one
tenant's dashboards cannot take every connection a shim process has.

A stream opened with a job page token (no API key) counts against the key that owns the job.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import redis.asyncio

from ecg_audio import keys

PREFIX = keys.STREAMS

# KEYS: the key's slot set. ARGV: now_ms, lease end ms, cap, slot id. 1 admitted, 0 full.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return 1
"""

# KEYS: the key's slot set. ARGV: lease end ms, slot id. Renews a slot that is still held (every
# slot's lease has the same length, so the newest end is the set's own expiry too).
_RENEW = """
if redis.call('ZADD', KEYS[1], 'XX', 'CH', ARGV[1], ARGV[2]) == 1 then
  redis.call('PEXPIREAT', KEYS[1], ARGV[1])
end
return 1
"""


@dataclass
class Slot:
    """One open stream's hold on its key's slots."""

    client: redis.asyncio.Redis
    key: str
    member: str
    lease_s: float

    async def renew(self) -> None:
        end_ms = int((time.time() + self.lease_s) * 1000)
        await self.client.eval(_RENEW, 1, self.key, end_ms, self.member)

    async def release(self) -> None:
        await self.client.zrem(self.key, self.member)


async def acquire(
    client: redis.asyncio.Redis, owner: str, cap: int, lease_s: float, *, prefix: str = PREFIX
) -> Slot | None:
    """A slot for a new stream of ``owner`` (an API key's fingerprint), or None when all ``cap`` are held.
    ``prefix``: which kind of stream (event streams by default; live transcription streams have their own)."""
    key, member = prefix + owner, uuid.uuid4().hex
    now = time.time()
    admitted = await client.eval(_ACQUIRE, 1, key, int(now * 1000), int((now + lease_s) * 1000), cap, member)
    return Slot(client, key, member, lease_s) if int(admitted) == 1 else None
