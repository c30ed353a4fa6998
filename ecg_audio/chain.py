"""The job chain by task *names*: the one definition of the message that starts a job.

Torch-free and task-free: the shim builds the chain from the task names of the stage table,
so it never imports the stage code.

``ChainMessages.build`` has Celery build the first task's message (``ecg.ingest``) as
``celery.chain(...).apply_async()`` would: the chain embed from Celery signatures (the
remaining stages, last first, as Celery pops them), the task protocol 2 headers, body and
``task-sent`` event fields from ``app.amqp.as_task_v2`` and Celery's ``Event``, the body
serialised by kombu. What is ours is only kombu's Redis envelope around it (base64 body,
delivery info, priority), pushed with LPUSH on the queue's list (a priority sub-queue when
a priority is given, see ``ecg_audio/queues.py``) and, when
``celeryconfig.task_send_sent_event`` is on, the event that Celery would PUBLISH for it
(Flower lists the task as soon as it is queued). This skips Celery's client path around
the message (freezing the canvas, the producer pool, the result-backend subscription),
which costs milliseconds per job where building the message costs well under one.

Two paths push it, so they cannot drift apart:

* the shim, in the same Redis script that creates the job record
  (``JobStore.create_or_get``): one round trip, and the record and its message appear
  together or not at all;
* ``send_chain``: operator commands (``celery -A worker.app jobs requeue``) and benches.

``tests/ecg_audio/test_chain_message.py`` compares the message with what Celery itself sends for the
same chain (so a Celery or kombu upgrade that changes the format fails there), and runs one
through a real worker.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import uuid
from base64 import b64encode
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from celery.events.event import Event
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset
from kombu.serialization import dumps as kombu_dumps

from ecg_audio import stage_table
from ecg_audio.queues import queue_key

STAGES: tuple[str, ...] = stage_table.STAGE_NAMES


def new_nonce() -> str:
    """Eight hex digits that tell one sending of a job's chain from another (a requeue)."""
    return uuid.uuid4().hex[:8]


def task_ids(job_id: str, nonce: str) -> list[str]:
    """One id per stage, ``{job_id}:{stage}:{nonce}``: an operator finds a job's tasks by it
    in Flower and in the result backend."""
    return [f"{job_id}:{stage}:{nonce}" for stage in STAGES]


@dataclass(frozen=True)
class ChainMessage:
    """What one sending of a job's chain writes to Redis."""

    task_id: str  # the first task's id (also the chain's root id)
    queue_key: str  # LPUSH target
    message: str  # the first task's message, as the transport stores it
    event_channel: str  # PUBLISH channel of the task-sent event
    event: str  # the task-sent event, '' when those are off


def _dumps(obj: Any) -> str:
    return str(kombu_dumps(obj, serializer="json")[2])


def _envelope(body: str, headers: dict[str, Any], properties: dict[str, Any]) -> str:
    """A message as kombu's Redis transport stores it: JSON, the body in base64."""
    return json.dumps(
        {
            "body": b64encode(body.encode("utf-8")).decode("ascii"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {**properties, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
        }
    )


@functools.lru_cache(maxsize=1)
def _celery() -> Celery:
    """An app with the project's settings, only to build messages (it never connects)."""
    app = Celery("ecg", set_as_current=False)
    # by name, as the worker app does: the settings module sits above this core package
    app.config_from_object("celeryconfig")
    return app


class ChainMessages:
    """Builds ``ChainMessage``s for one Redis database (the event channel names it)."""

    def __init__(self, *, db: int = 0, sent_event: bool | None = None) -> None:
        conf = _celery().conf
        if (conf.broker_transport_options or {}).get("global_keyprefix"):
            raise ValueError("global_keyprefix is not supported by ChainMessages: it would prefix every key")
        self.sent_event = bool(conf.task_send_sent_event if sent_event is None else sent_event)
        self.event_channel = f"/{int(db)}.celeryev/task.sent"
        # Celery puts the sending app's oid here; the Redis result backend never reads it
        self.reply_to = str(uuid.uuid4())
        self._clock = itertools.count(1)  # this sender's Lamport clock for its events
        self._pid = -1
        self._origin = ""

    @classmethod
    def for_client(cls, client: Any, *, sent_event: bool | None = None) -> ChainMessages:
        """For the database a redis-py client (sync or asyncio) talks to."""
        return cls(db=int(client.connection_pool.connection_kwargs.get("db", 0) or 0), sent_event=sent_event)

    def origin(self) -> str:
        pid = os.getpid()
        if pid != self._pid:  # after a fork, the child is another sender
            self._pid, self._origin = pid, anon_nodename()
        return self._origin

    def build(self, job_id: str, *, priority: int | None = None, nonce: str | None = None) -> ChainMessage:
        app = _celery()
        ids = task_ids(job_id, nonce or new_nonce())
        rows = stage_table.STAGES
        first, first_id = rows[0].task_name, ids[0]
        queue = rows[0].queue
        chain = []
        for stage, tid in zip(reversed(rows[1:]), reversed(ids[1:]), strict=True):
            options: dict[str, Any] = {"queue": stage.queue, "task_id": tid}
            if priority is not None:
                options["priority"] = priority
            options["reply_to"] = self.reply_to
            chain.append(app.signature(stage.task_name, **options))
        origin = self.origin()
        # only the job id travels: stages read the request from the job record, so URLs (and any
        # token in them) stay out of messages, results and their logs
        task = app.amqp.as_task_v2(
            first_id,
            first,
            args=({"job_id": job_id},),
            chain=chain,
            reply_to=self.reply_to,
            create_sent_event=self.sent_event,
            origin=origin,
            ignore_result=None,
        )
        properties = {
            **task.properties,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": priority or 0,
        }
        message = _envelope(_dumps(task.body), task.headers, properties)
        event = ""
        if task.sent_event is not None:
            event = self._sent_event(origin, {**task.sent_event, "queue": queue, "exchange": "", "routing_key": queue})
        return ChainMessage(first_id, queue_key(queue, priority), message, self.event_channel, event)

    def _sent_event(self, origin: str, fields: dict[str, Any]) -> str:
        """The task-sent event, as Celery's event dispatcher publishes it (transient, on celeryev)."""
        clock = next(self._clock)
        event = Event("task-sent", hostname=origin, utcoffset=utcoffset(), pid=os.getpid(), clock=clock, **fields)
        properties = {
            "delivery_mode": 1,
            "delivery_info": {"exchange": "celeryev", "routing_key": "task.sent"},
            "priority": 0,
        }
        return _envelope(_dumps(event), {"hostname": origin}, properties)


def push(client: redis.Redis, msg: ChainMessage) -> None:
    """LPUSH the message (and PUBLISH its task-sent event) in one round trip."""
    pipe = client.pipeline(transaction=True)
    pipe.lpush(msg.queue_key, msg.message)
    if msg.event:
        pipe.publish(msg.event_channel, msg.event)
    pipe.execute()


@functools.lru_cache(maxsize=8)
def _sender(url: str) -> tuple[redis.Redis, ChainMessages]:
    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)
    return client, ChainMessages.for_client(client)


def send_chain(app: Any, payload: dict[str, Any], *, priority: int | None = None) -> str:
    """Enqueue ingest → … → merge for a job (its record must exist); returns the first task's id.

    ``app`` is the Celery app whose broker receives it. The message is the one the shim
    sends (``ChainMessages``); the job record is not touched.
    """
    from ecg_audio.settings import get_settings

    client, messages = _sender(str(app.conf.broker_url or get_settings().redis_url))
    msg = messages.build(str(payload["job_id"]), priority=priority)
    push(client, msg)
    return msg.task_id


# --- the next stage, published by the stage that holds the lease --------------------------------

# KEYS: the stage's lease, the job record. ARGV: the publisher's lease token, this stage, the next
# stage, then the commands that publish the next stage's message: name, argument count, arguments...
# Returns 1 published; 0 the lease is not (or no longer) the publisher's: another delivery of this
# stage took over and publishes; 2 published already, or the next stage already started.
_PUBLISH_NEXT_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('HEXISTS', KEYS[2], 'published:' .. ARGV[2]) == 1
   or redis.call('HEXISTS', KEYS[2], 'started:' .. ARGV[3]) == 1 then return 2 end
local allowed = {LPUSH = true, PUBLISH = true, PEXPIRE = true}
local i = 4
while i <= #ARGV do
  local name, n = string.upper(ARGV[i]), tonumber(ARGV[i + 1])
  if not allowed[name] then return redis.error_reply('unexpected publish command ' .. name) end
  redis.call(name, unpack(ARGV, i + 2, i + 1 + n))
  i = i + 2 + n
end
redis.call('HSET', KEYS[2], 'published:' .. ARGV[2], '1')
redis.call('HINCRBY', KEYS[2], 'publishes:' .. ARGV[2], 1)
return 1
"""


class _Captured:
    """Stands in for kombu's publish batch (``Producer._batch_local.current``): the Redis channel
    routes each message as it would publish it, and hands this object its final Redis commands
    (``_publish_batch.add``: LPUSH on the queue or its priority sub-queue, PUBLISH of the task-sent
    event) instead of running them."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple[Any, ...]]] = []

    def publish(self, channel: Any, message: Any, **kwargs: Any) -> Any:
        return channel.basic_publish(message, _publish_batch=self, **kwargs)

    def add(self, name: str, *args: Any) -> None:
        self.commands.append((name, args))


def next_stage_commands(app: Any, request: Any, retval: Any) -> list[tuple[str, tuple[Any, ...]]]:
    """The Redis commands that publish the next task of ``request``'s chain, as Celery's worker would
    after the task returns ``retval`` (``celery.app.trace``: ``signature(chain[-1]).apply_async((retval,),
    chain=chain[:-1], parent_id=..., root_id=..., priority=...)``), built by Celery and routed by kombu,
    but not run. [] when the chain has no next task."""
    from celery import signature

    chain = list(request.chain or [])
    if not chain:
        return []
    priority = (request.delivery_info or {}).get("priority") if app.conf.task_inherit_parent_priority else None
    captured = _Captured()
    with app.producer_or_acquire() as producer:
        if not producer.connection.transport.implements.batch_publish:
            raise RuntimeError("the broker transport cannot hand over its publish commands (kombu's Redis can)")
        producer._batch_local.current = captured
        try:
            signature(chain[-1], app=app).apply_async(
                (retval,),
                chain=chain[:-1],
                parent_id=request.id,
                root_id=request.root_id or request.id,
                priority=priority,
                producer=producer,
            )
        finally:
            del producer._batch_local.current
    return captured.commands


def publish_next(
    client: redis.Redis, commands: list[tuple[str, tuple[Any, ...]]], *, lease_key: str, token: str,
    record_key: str, stage: str, next_stage: str
) -> int:
    """Run ``commands`` (``next_stage_commands``) only while ``token`` holds the stage's lease, the job's
    next stage has neither been published for this run nor started: one Redis script, so a delivery
    whose lease lapsed (Redis away longer than its TTL, a stalled process) never publishes beside the
    one that took it over. See ``_PUBLISH_NEXT_LUA`` for the return codes."""
    args: list[Any] = [token, stage, next_stage]
    for name, cmd_args in commands:
        args += [name, len(cmd_args), *cmd_args]
    return int(client.eval(_PUBLISH_NEXT_LUA, 2, lease_key, record_key, *args))  # type: ignore[arg-type]
