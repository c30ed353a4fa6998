"""The job chain by task *names*: the one definition of the message that starts a job.

Torch-free and task-free: the shim builds the chain from names in ``celeryconfig.CHAIN``,
so it never imports the stage code.

``ChainMessages.build`` writes the first task's message (``ecg.ingest``) exactly as
``celery.chain(...).apply_async()`` and kombu's Redis transport store it: Celery's task
protocol 2 in JSON, the body base64 in kombu's envelope, the remaining stages in the
body's ``chain`` embed (last stage first, as Celery pops them), pushed with LPUSH on the
queue's list (a priority sub-queue when a priority is given); and, when
``celeryconfig.task_send_sent_event`` is on, the ``task-sent`` event that Celery would
PUBLISH for it (Flower lists the task as soon as it is queued). Building it is a few
dozen microseconds of string work, where Celery's client-side publish of the same chain
(signatures, freezing, producer pool, result-backend subscription, the event) costs
milliseconds, which at a thousand submissions a second is the shim's whole CPU budget.

Two paths push it, so they cannot drift apart:

* the shim, in the same Redis script that creates the job record
  (``JobStore.create_or_get``): one round trip, and the record and its message appear
  together or not at all;
* ``send_chain``: operator commands (``celery -A worker.app jobs requeue``) and benches.

``tests/test_chain_message.py`` compares the message with what Celery itself sends for the
same chain (so a Celery or kombu upgrade that changes the format fails there), and runs one
through a real worker.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import os
import time
import uuid
from base64 import b64encode
from dataclasses import dataclass
from typing import Any

import redis
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset

import celeryconfig

# kombu's Redis transport names a priority sub-queue ``{queue}\x06\x16{step}``
PRIORITY_SEP = "\x06\x16"
STAGES: tuple[str, ...] = tuple(name.split(".", 1)[1] for name in celeryconfig.CHAIN)


def job_payload(
    job_id: str,
    source: str,
    *,
    language: str | None = None,
    callback_url: str | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "source": source,
        "language": language,
        "callback_url": callback_url,
        "options": dict(options or {}),
    }


def new_nonce() -> str:
    """Eight hex digits that tell one sending of a job's chain from another (a requeue)."""
    return uuid.uuid4().hex[:8]


def task_ids(job_id: str, nonce: str) -> list[str]:
    """One id per stage, ``{job_id}:{stage}:{nonce}``: an operator finds a job's tasks by it
    in Flower and in the result backend."""
    return [f"{job_id}:{stage}:{nonce}" for stage in STAGES]


def queue_key(queue: str, priority: int | None) -> str:
    """The Redis list that kombu's Redis transport pushes a message of ``priority`` to."""
    if not priority:
        return queue
    p = max(0, min(9, int(priority)))  # kombu clamps to 0..9
    steps = sorted(celeryconfig.PRIORITY_STEPS)
    step = steps[bisect.bisect(steps, p) - 1]
    return f"{queue}{PRIORITY_SEP}{step}" if step else queue


@dataclass(frozen=True)
class ChainMessage:
    """What one sending of a job's chain writes to Redis."""

    task_id: str  # the first task's id (also the chain's root id)
    queue_key: str  # LPUSH target
    message: str  # the first task's message, as the transport stores it
    event_channel: str  # PUBLISH channel of the task-sent event
    event: str  # the task-sent event, '' when those are off


def _dumps(obj: Any) -> str:
    # kombu's JSON serialiser is json.dumps with its default separators
    return json.dumps(obj)


def _b64(text: str) -> str:
    return b64encode(text.encode("utf-8")).decode("ascii")


class ChainMessages:
    """Builds ``ChainMessage``s for one Redis database (the event channel names it)."""

    def __init__(self, *, db: int = 0, sent_event: bool | None = None) -> None:
        if celeryconfig.broker_transport_options.get("global_keyprefix"):
            raise ValueError("global_keyprefix is not supported by ChainMessages: it would prefix every key")
        self.sent_event = bool(celeryconfig.task_send_sent_event if sent_event is None else sent_event)
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
        ids = task_ids(job_id, nonce or new_nonce())
        first, first_id = celeryconfig.CHAIN[0], ids[0]
        queue = celeryconfig.TASK_QUEUES[first]
        chain: list[dict[str, Any]] = []
        for name, tid in zip(reversed(celeryconfig.CHAIN[1:]), reversed(ids[1:]), strict=True):
            options: dict[str, Any] = {"queue": celeryconfig.TASK_QUEUES[name], "task_id": tid}
            if priority is not None:
                options["priority"] = priority
            options["reply_to"] = self.reply_to
            chain.append(
                {"task": name, "args": [], "kwargs": {}, "options": options, "subtask_type": None, "immutable": False}
            )
        # only the job id travels: stages read the request from the job record, so URLs (and any
        # token in them) stay out of messages, results and their logs
        args = [{"job_id": job_id}]
        body = _dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": chain, "chord": None}])
        argsrepr = repr(({"job_id": job_id},))
        origin = self.origin()
        headers: dict[str, Any] = {
            "lang": "py",
            "task": first,
            "id": first_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": first_id,
            "parent_id": None,
            "argsrepr": argsrepr,
            "kwargsrepr": "{}",
            "origin": origin,
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        }
        properties = {
            "correlation_id": first_id,
            "reply_to": self.reply_to,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": priority or 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        }
        message = _dumps(
            {
                "body": _b64(body),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": headers,
                "properties": properties,
            }
        )
        event = self._sent_event(first, first_id, argsrepr, queue, origin) if self.sent_event else ""
        return ChainMessage(first_id, queue_key(queue, priority), message, self.event_channel, event)

    def _sent_event(self, name: str, task_id: str, argsrepr: str, queue: str, origin: str) -> str:
        fields = {
            "hostname": origin,
            "utcoffset": utcoffset(),
            "pid": os.getpid(),
            "clock": next(self._clock),
            "uuid": task_id,
            "root_id": task_id,
            "parent_id": None,
            "name": name,
            "args": argsrepr,
            "kwargs": "{}",
            "retries": 0,
            "eta": None,
            "expires": None,
            "queue": queue,
            "exchange": "",
            "routing_key": queue,
            "timestamp": time.time(),
            "type": "task-sent",
        }
        return _dumps(
            {
                "body": _b64(_dumps(fields)),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": {"hostname": origin},
                "properties": {
                    "delivery_mode": 1,
                    "delivery_info": {"exchange": "celeryev", "routing_key": "task.sent"},
                    "priority": 0,
                    "body_encoding": "base64",
                    "delivery_tag": str(uuid.uuid4()),
                },
            }
        )


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
