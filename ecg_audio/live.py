"""Live transcription between the shim and the stream workers, through Redis.

The shim and a stream worker may run on different machines; everything between them is here:

* a stream worker announces itself in ``LIVE_WORKERS`` and keeps a heartbeat key (its slot count,
  ``HEARTBEAT_TTL_MS``) that it renews every ``HEARTBEAT_EVERY_S``: a worker that dies is gone
  from Redis within the TTL, with no clock compared between hosts;
* the shim claims a slot (``claim_slot``: one script picks the live worker with most free slots
  and adds the stream to its busy set, forgetting workers whose heartbeat lapsed), then pushes a
  ``StartRequest`` on that worker's start queue;
* audio goes in on the stream's ``LIVE_AUDIO`` Redis stream (``pcm`` entries, then one ``stop``),
  messages come out on its ``LIVE_OUT`` stream (``m``: one JSON message of the WebSocket contract,
  or the internal ``done`` once every final is out);
* the live finals of a stream that became a job are kept under ``LIVE_RESULT`` for the job's merge
  (``result.live``);
* while a stream runs, its job page may watch it before the job exists: ``LIVE_VIEW`` names the
  key that owns the stream, its locale and the ``first_run`` its job will have (its page link is
  signed for that job), and the page reads the messages out with its own ``XREAD`` from the start
  (a Redis stream is read by many readers without being consumed).

Every key here has a TTL or is deleted by whoever ends the stream (Redis runs ``noeviction``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import redis
import redis.asyncio

from ecg_audio import keys

HEARTBEAT_TTL_MS = 3000  # a worker that stops renewing is gone this long after (the client hears within 5 s)
HEARTBEAT_EVERY_S = 1.0
STREAM_TTL_S = 3600  # audio in and messages out of a stream, renewed while it runs
DONE = "done"  # the worker's last message of a stream: every final is out
ABANDON = "abandon"  # an audio entry: the client left, drop the stream without finishing it
# an audio entry: everything heard so far is made final now, the stream goes on (a realtime client's
# commit); the worker answers with a FLUSHED message once those finals are out
FLUSH = "flush"
FLUSHED = "flushed"
ABANDON_TTL_S = 60
OUT_LINGER_S = 60  # a stream's messages out outlive it this long: its page may still be reading them

# KEYS[1] the workers' set; ARGV: stream id, heartbeat prefix, busy prefix
_CLAIM_LUA = """
local best, best_free = nil, 0
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local slots = redis.call('GET', ARGV[2] .. w)
  if not slots then
    redis.call('SREM', KEYS[1], w)
    redis.call('DEL', ARGV[3] .. w)
  else
    local free = tonumber(slots) - redis.call('SCARD', ARGV[3] .. w)
    if free > best_free then best, best_free = w, free end
  end
end
if best then
  redis.call('SADD', ARGV[3] .. best, ARGV[1])
  return best
end
return false
"""


def audio_key(stream_id: str) -> str:
    return keys.LIVE_AUDIO + stream_id


def out_key(stream_id: str) -> str:
    return keys.LIVE_OUT + stream_id


def view_key(stream_id: str) -> str:
    return keys.LIVE_VIEW + stream_id


def start_key(worker_id: str) -> str:
    return keys.LIVE_START + worker_id


def busy_key(worker_id: str) -> str:
    return keys.LIVE_BUSY + worker_id


def heartbeat_key(worker_id: str) -> str:
    return keys.LIVE_HEARTBEAT + worker_id


@dataclass(frozen=True)
class StartRequest:
    """What a stream worker needs to start a stream (the WebSocket's query, checked by the shim)."""

    stream_id: str
    language: str | None = None
    num_speakers: int | None = None
    max_speakers: int | None = None
    sample_rate: int = 16000

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> StartRequest:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class LiveView:
    """A running stream as its job page sees it before the stream's job exists."""

    stream_id: str
    owner: str  # the fingerprint of the API key the stream (and its job) belongs to
    locale: str | None  # the stream's ``locale`` (its job's options.locale)
    first_run: int = 1  # what the job's record will say (an id purged before goes on from its last run)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


# --- the worker's side (sync) -----------------------------------------------------------------


def heartbeat(r: redis.Redis, worker_id: str, slots: int) -> None:
    pipe = r.pipeline()
    pipe.set(heartbeat_key(worker_id), slots, px=HEARTBEAT_TTL_MS)
    pipe.sadd(keys.LIVE_WORKERS, worker_id)
    pipe.execute()


def leave(r: redis.Redis, worker_id: str) -> None:
    """A worker that stops: its heartbeat, membership and busy set go at once."""
    pipe = r.pipeline()
    pipe.delete(heartbeat_key(worker_id), busy_key(worker_id), start_key(worker_id))
    pipe.srem(keys.LIVE_WORKERS, worker_id)
    pipe.execute()


def send(r: redis.Redis, stream_id: str, message: dict[str, Any]) -> None:
    pipe = r.pipeline()
    pipe.xadd(out_key(stream_id), {"m": json.dumps(message, ensure_ascii=False)})
    pipe.expire(out_key(stream_id), STREAM_TTL_S)
    pipe.execute()


def release(r: redis.Redis, worker_id: str, stream_id: str) -> None:
    pipe = r.pipeline()
    pipe.srem(busy_key(worker_id), stream_id)
    pipe.delete(audio_key(stream_id))
    pipe.execute()


def slot_counts(r: redis.Redis) -> tuple[int, int]:
    """(busy, free) stream slots over the live stream workers: the scaling metric's share of streams."""
    busy = free = 0
    for worker in r.smembers(keys.LIVE_WORKERS):
        wid = worker.decode() if isinstance(worker, bytes) else str(worker)
        slots = r.get(heartbeat_key(wid))
        if slots is None:
            continue
        used = int(r.scard(busy_key(wid)))
        busy += used
        free += max(0, int(slots) - used)
    return busy, free


# --- the shim's side (async) ------------------------------------------------------------------


async def claim_slot(r: redis.asyncio.Redis, stream_id: str) -> str | None:
    """The id of the live worker that takes the stream (a slot now held), or None: every slot is taken."""
    got = await r.eval(_CLAIM_LUA, 1, keys.LIVE_WORKERS, stream_id, keys.LIVE_HEARTBEAT, keys.LIVE_BUSY)  # type: ignore[misc]
    if not got:
        return None
    return got.decode() if isinstance(got, bytes) else str(got)


async def start(r: redis.asyncio.Redis, worker_id: str, request: StartRequest) -> None:
    pipe = r.pipeline()
    pipe.delete(out_key(request.stream_id))  # what an earlier stream of this id left for its late readers
    pipe.lpush(start_key(worker_id), request.to_json())
    pipe.expire(start_key(worker_id), STREAM_TTL_S)
    await pipe.execute()


async def push_audio(r: redis.asyncio.Redis, stream_id: str, pcm: bytes) -> None:
    pipe = r.pipeline()
    pipe.xadd(audio_key(stream_id), {"pcm": pcm})
    pipe.expire(audio_key(stream_id), STREAM_TTL_S)
    await pipe.execute()


async def push_stop(r: redis.asyncio.Redis, stream_id: str) -> None:
    await r.xadd(audio_key(stream_id), {"stop": "1"})


async def push_flush(r: redis.asyncio.Redis, stream_id: str) -> None:
    await r.xadd(audio_key(stream_id), {FLUSH: "1"})


async def worker_alive(r: redis.asyncio.Redis, worker_id: str) -> bool:
    return bool(await r.exists(heartbeat_key(worker_id)))


async def abandon(r: redis.asyncio.Redis, worker_id: str, stream_id: str) -> None:
    """The shim's cleanup: a worker still at the stream (its client left) drops it at once, the slot
    is freed (whether or not the worker did), the stream's page sees it ended; the messages out stay
    a little while (``OUT_LINGER_S``) for a page still reading them."""
    pipe = r.pipeline()
    pipe.xadd(audio_key(stream_id), {ABANDON: "1"})
    pipe.expire(audio_key(stream_id), ABANDON_TTL_S)
    pipe.srem(busy_key(worker_id), stream_id)
    pipe.delete(view_key(stream_id))
    pipe.expire(out_key(stream_id), OUT_LINGER_S)
    await pipe.execute()


async def open_view(r: redis.asyncio.Redis, stream_id: str, owner: str, locale: str | None, ttl_s: float) -> LiveView:
    """The stream made watchable on its job page, for ``ttl_s`` unless renewed (``renew_view``):
    a shim that died stops renewing it. Its ``first_run`` is the one ``JobStore.create`` will give
    the job (the runs of an id purged before go on), so the page link minted now opens the job too."""
    retired = await r.hget(keys.JOBS_RETIRED_RUNS, stream_id)  # type: ignore[misc]
    view = LiveView(stream_id, owner, locale, int(retired) + 1 if retired else 1)
    await r.set(view_key(stream_id), view.to_json(), px=int(ttl_s * 1000))
    return view


async def renew_view(r: redis.asyncio.Redis, stream_id: str, ttl_s: float) -> None:
    await r.pexpire(view_key(stream_id), int(ttl_s * 1000))


async def get_view(r: redis.asyncio.Redis, stream_id: str) -> LiveView | None:
    """The running stream ``stream_id`` as its page sees it; None once it has ended (or never ran)."""
    raw = await r.get(view_key(stream_id))
    return LiveView(**json.loads(raw)) if raw else None


async def store_live_result(r: redis.asyncio.Redis, job_id: str, live: dict[str, Any], ttl_s: int) -> None:
    await r.set(keys.LIVE_RESULT + job_id, json.dumps(live, ensure_ascii=False), ex=ttl_s)


def live_result(r: redis.Redis, job_id: str) -> dict[str, Any] | None:
    """The live finals of a job that began as a live stream (``result.live``), or None."""
    raw = r.get(keys.LIVE_RESULT + job_id)
    return json.loads(raw) if raw else None  # type: ignore[arg-type]
