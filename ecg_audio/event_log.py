"""The per-job event log: every progress milestone and the final event of a job, in order.

A Redis Stream at ``ecg:job:{job_id}:events``, one entry per event, written whether or not
the job has a ``callback_url``. Entry fields: ``event_id`` (the id the callback carries in
``X-ECG-Event-Id`` and in its body) and ``payload`` (the callback's JSON body, ``event_id``
included). The stream is trimmed to about ``MAXLEN`` entries and expires with the job record.

The shim's ``GET /jobs/{id}/events`` (Server-Sent Events) and the job page read it; the
callback outbox delivers the same events to the backend. Event ids are made here
(``new_event_id``) so that a job without a callback has them too, and the outbox reuses them.

Appending is one Redis script: it refuses an event whose id equals the last entry's (a
redelivered task reporting again, a final event made twice), so a reader sees each event once.

A final event's id is ``{job_id}:final``, or ``{job_id}:final:{run}`` when an operator's requeue
starts a new run (the single event builder numbers them): a log can hold a final event with a
later run after it. Readers therefore stop at a final event only when nothing follows it (yet):
a live follower ends with its run; one that resumes after a final event that is no longer the
last gets the next run.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio

from ecg_audio import keys

KEY_PREFIX = keys.JOB
KEY_SUFFIX = keys.EVENTS_SUFFIX
MAXLEN = 1000
DEFAULT_TTL_S = 7 * 24 * 3600  # JobStore's default: the log lives as long as the record
FINAL_SUFFIX = ":final"

# KEYS[1]: the stream. ARGV: event_id, payload JSON, maxlen, ttl_s.
# Returns the new entry id, or false when the event is refused (a repeat of the last event).
_APPEND_LUA = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'event_id' then
      local prev = fields[i + 1]
      if prev == ARGV[1] then return false end
    end
  end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'event_id', ARGV[1], 'payload', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return id
"""


def key(job_id: str) -> str:
    return f"{KEY_PREFIX}{job_id}{KEY_SUFFIX}"


def new_event_id(job_id: str, *, final: bool = False) -> str:
    """The id of a job's next event: ``{job_id}:final`` for the final one (receivers can tell it
    apart, and a repeat of it is recognised), else ``{job_id}:<12 hex>``."""
    return f"{job_id}{FINAL_SUFFIX}" if final else f"{job_id}:{uuid.uuid4().hex[:12]}"


_FINAL = re.compile(r":final(:\d+)?$")


def is_final(event_id: str) -> bool:
    """``{job_id}:final`` or ``{job_id}:final:{run}``."""
    return _FINAL.search(event_id) is not None


def append(
    client_or_pipeline: Any,
    job_id: str,
    event_id: str,
    payload: dict[str, Any],
    *,
    ttl_s: int = DEFAULT_TTL_S,
) -> Any:
    """Append one event to the job's log.

    ``client_or_pipeline``: a ``redis.Redis`` or one of its pipelines (the event then goes
    with the pipeline's other commands). Returns the stream entry id (bytes or str, as the
    client decodes), ``None`` when the event was refused (a repeat of the last event), or, on
    a pipeline, the pipeline (the reply comes with ``execute()``). On a ``redis.asyncio``
    client, the same as an awaitable.
    """
    body = json.dumps({**payload, "event_id": event_id}, ensure_ascii=False, separators=(",", ":"))
    args = [event_id, body, MAXLEN, int(ttl_s)]
    return client_or_pipeline.eval(_APPEND_LUA, 1, key(job_id), *args)


@dataclass(frozen=True)
class Event:
    entry_id: str  # the stream's own id (ms-seq): where a reader resumes
    event_id: str  # the callback's event id: what clients see and send back as Last-Event-ID
    payload: dict[str, Any]

    @property
    def final(self) -> bool:
        return is_final(self.event_id)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _event(entry_id: Any, fields: dict[Any, Any]) -> Event:
    f = {_text(k): _text(v) for k, v in fields.items()}
    return Event(_text(entry_id), f.get("event_id", ""), json.loads(f.get("payload", "{}")))


def _entries(entries: Any) -> list[Event]:
    """``XRANGE`` entries, or the one stream of an ``XREAD`` reply (RESP2: ``[[key, entries]]``;
    RESP3: ``{key: [entries]}``), as events."""
    if isinstance(entries, dict):
        entries = next(iter(entries.values()), [[]])[0]
    elif entries and isinstance(entries[0], list | tuple) and len(entries[0]) == 2 and isinstance(entries[0][1], list):
        entries = entries[0][1]
    return [_event(eid, fields) for eid, fields in entries or ()]


def _after(events: list[Event], last_event_id: str | None) -> tuple[str, list[Event]]:
    """Where to resume after ``last_event_id``: (the stream position, the events past it).

    An id not in the log (trimmed away, or from another job) restarts from the beginning:
    a client may then see an event again, but misses none.
    """
    if last_event_id:
        for i in range(len(events) - 1, -1, -1):
            if events[i].event_id == last_event_id:
                return events[i].entry_id, events[i + 1 :]
    return "0-0", events


# --- sync reader ------------------------------------------------------------


def read_all(client: redis.Redis, job_id: str) -> list[Event]:
    entries: Any = client.xrange(key(job_id))
    return _entries(entries)


# --- asyncio reader ---------------------------------------------------------


async def last_event_async(client: redis.asyncio.Redis, job_id: str) -> Event | None:
    entries: Any = await client.xrevrange(key(job_id), count=1)
    found = _entries(entries)
    return found[0] if found else None


async def read_all_async(client: redis.asyncio.Redis, job_id: str) -> list[Event]:
    entries: Any = await client.xrange(key(job_id))
    return _entries(entries)


# --- one reader for many streams ----------------------------------------------


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _streams(reply: Any) -> list[tuple[str, list[Event]]]:
    """An ``XREAD`` reply over several streams (RESP2 list or RESP3 dict) as (key, events)."""
    if isinstance(reply, dict):
        return [(_text(k), _entries(v[0] if v and isinstance(v[0], list) else v)) for k, v in reply.items()]
    return [(_text(k), _entries(entries)) for k, entries in reply or ()]


class Subscription:
    """One follower of one job's log, from ``EventHub.subscribe``: iterate it, then ``close()`` it."""

    def __init__(self, hub: EventHub, stream: str, position: str, backlog: list[Event]) -> None:
        self.hub = hub
        self.stream = stream
        self.position = position  # the last entry this follower has (or will have, from the backlog)
        self.backlog = backlog
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.gap_to: str | None = None  # the hub had read past ``position``: fetch up to here first

    async def events(self, idle_s: float = 15.0) -> AsyncIterator[Event | None]:
        """The backlog, then new events until the final one; ``None`` after each quiet ``idle_s``."""
        position = self.position
        for ev in self.backlog:
            yield ev
            if ev.final and ev is self.backlog[-1] and self.gap_to is None:  # not an earlier run's
                return
        if self.gap_to is not None:
            missed = _entries(await self.hub.r.xrange(self.stream, min=f"({position}", max=self.gap_to))
            for ev in missed:
                yield ev
                position = ev.entry_id
                if ev.final and ev is missed[-1] and self.queue.empty():
                    return
        while True:
            try:
                ev = await asyncio.wait_for(self.queue.get(), idle_s)
            except TimeoutError:
                yield None
                continue
            if _order(ev.entry_id) <= _order(position):
                continue  # already had it (backlog or gap)
            yield ev
            position = ev.entry_id
            if ev.final:
                return

    def close(self) -> None:
        self.hub._unsubscribe(self)


class EventHub:
    """One ``XREAD BLOCK`` over every stream a process's clients follow, on one connection.

    A follower reads its backlog with ``XRANGE``, then subscribes; the hub's single reader hands
    each new entry to the queues of that stream's followers. A thousand open event streams cost
    one blocked Redis connection and one task, not a connection (nor a thread) each. A stream
    subscribed while the reader is blocked joins at its next call, at most ``block_ms`` later
    (nothing is lost meanwhile: the reader starts from the follower's position).
    """

    def __init__(self, client: redis.asyncio.Redis, *, block_ms: int = 200, count: int = 100) -> None:
        self.r = client
        self.block_ms = block_ms
        self.count = count
        self.positions: dict[str, str] = {}  # stream key -> the last entry id the reader has seen
        self.subs: dict[str, set[Subscription]] = {}
        self._task: asyncio.Task[None] | None = None

    async def subscribe(self, job_id: str, *, last_event_id: str | None = None) -> Subscription:
        """Follow a job's log from after ``last_event_id`` (from its start without one)."""
        stream = key(job_id)
        position, backlog = _after(await read_all_async(self.r, job_id), last_event_id)
        if backlog:
            position = backlog[-1].entry_id
        return self._subscribe(stream, position, backlog)

    def _subscribe(self, stream: str, position: str, backlog: list[Event]) -> Subscription:
        sub = Subscription(self, stream, position, backlog)
        known = self.positions.get(stream)
        if known is None:
            self.positions[stream] = position
        elif _order(known) > _order(position):
            sub.gap_to = known
        self.subs.setdefault(stream, set()).add(sub)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._read(), name="ecg-event-hub")
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self.subs.get(sub.stream)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self.subs[sub.stream]
            self.positions.pop(sub.stream, None)

    async def _read(self) -> None:
        while self.subs:
            try:
                streams: dict[Any, Any] = dict(self.positions)
                reply: Any = await self.r.xread(streams, count=self.count, block=self.block_ms)
            except redis.RedisError:
                # Redis away: the followers keep their queues and get keep-alives; try again shortly
                await asyncio.sleep(0.5)
                continue
            for stream, events in _streams(reply):
                for ev in events:
                    known = self.positions.get(stream)
                    if known is not None and _order(ev.entry_id) > _order(known):
                        self.positions[stream] = ev.entry_id
                    for sub in self.subs.get(stream, ()):
                        sub.queue.put_nowait(ev)
