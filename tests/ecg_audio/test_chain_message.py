"""The chain message the shim and ``send_chain`` push by hand is the one Celery itself sends.

``ecg_audio.chain.ChainMessages`` writes the first task's message (and its task-sent
event) without Celery's client path. Here Celery's own ``chain(...).apply_async()`` (what
the shim used to call) sends the same chain to a real Redis, and the two are compared field
by field, in order, after the values that are random per sending (delivery tags, the
sender's reply-to oid, timestamps) are set aside. Then both kinds of hand-built message
(the shim's one-script path, and ``send_chain`` with a priority, into a priority
sub-queue) are run by a real worker, and every stage of the chain must have run under
the ids ``{job_id}:{stage}:{nonce}``.
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

import celeryconfig
from ecg_audio.chain import STAGES, ChainMessages, queue_key, send_chain, task_ids
from ecg_audio.jobs import JobStore
from tests.conftest import Proc, wait_for_worker, wait_job
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(600)

# a database no worker reads: Celery's reference messages must not run
REFERENCE_DB = 14


def celery_send(app: Any, job_id: str, nonce: str, priority: int | None) -> None:
    """The chain as Celery's canvas sends it (the shim's code before the fast path)."""
    from celery import chain

    sigs = []
    for i, name in enumerate(celeryconfig.CHAIN):
        opts: dict[str, Any] = {"queue": celeryconfig.TASK_QUEUES[name], "task_id": f"{job_id}:{STAGES[i]}:{nonce}"}
        if priority is not None:
            opts["priority"] = priority
        sigs.append(app.signature(name, args=({"job_id": job_id},) if i == 0 else (), **opts))
    chain(*sigs).apply_async()


@pytest.fixture()
def reference(redis_url: str) -> Iterator[tuple[Any, redis.Redis]]:
    from celery import Celery

    url = redis_url.rsplit("/", 1)[0] + f"/{REFERENCE_DB}"
    app = Celery("reference")
    app.config_from_object(celeryconfig)
    app.conf.broker_url = app.conf.result_backend = url
    # As in the shim's process, the stage tasks are unknown here: once another test has imported
    # tasks.pipeline_tasks, its shared tasks join every app at finalize, and Celery would fill the
    # message from their definitions (time limits, ignore_result), which the shim never has.
    app.finalize()
    for name in celeryconfig.CHAIN:
        app.tasks.pop(name, None)
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    yield app, r
    r.flushdb()
    app.close()


class Events:
    """Every task-sent event published for REFERENCE_DB, as a subscriber (Flower) receives it."""

    PROBE = f"/{REFERENCE_DB}.celeryev/test-probe"

    def __init__(self, r: redis.Redis) -> None:
        self.got: list[tuple[str, str]] = []
        self.stop = threading.Event()
        self.pubsub = r.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(f"/{REFERENCE_DB}.celeryev/*")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

        def subscribed() -> bool:
            # PSUBSCRIBE returns before Redis has subscribed: it has once a probe comes back
            if any(c == self.PROBE for c, _ in self.got):
                return True
            r.publish(self.PROBE, "probe")
            return False

        wait_for(subscribed, what="the event subscription")

    def _run(self) -> None:
        while not self.stop.is_set():
            m = self.pubsub.get_message(timeout=0.05)
            if m is not None:
                self.got.append((m["channel"], m["data"]))

    def events(self) -> list[tuple[str, str]]:
        return [(c, d) for c, d in list(self.got) if c != self.PROBE]

    def wait(self, n: int) -> list[tuple[str, str]]:
        return wait_for(lambda: len(self.events()) >= n and self.events(), what=f"{n} task-sent events")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.pubsub.close()


def normalised(raw: str, reply_to: str) -> tuple[str, dict[str, Any]]:
    """The envelope with its body decoded, reply-to and delivery tag replaced; as ordered JSON text."""
    env = json.loads(raw)
    tag = env["properties"].pop("delivery_tag")
    assert str(uuid.UUID(tag)) == tag
    body = json.loads(base64.b64decode(env["body"]))
    env["body"] = body
    text = json.dumps(env).replace(reply_to, "<reply_to>")
    return text, env


def normalised_event(raw: str) -> tuple[str, dict[str, Any]]:
    env = json.loads(raw)
    env["properties"].pop("delivery_tag")
    fields = json.loads(base64.b64decode(env["body"]))
    assert isinstance(fields.pop("timestamp"), float) and isinstance(fields.pop("clock"), int)
    env["body"] = fields
    return json.dumps(env), env


@pytest.mark.parametrize("priority", [None, 5])
def test_message_and_event_are_those_celery_sends(reference: tuple[Any, redis.Redis], priority: int | None) -> None:
    app, r = reference
    events = Events(r)
    try:
        nonce = uuid.uuid4().hex[:8]
        celery_send(app, "ref-job.1", nonce, priority)
        key = queue_key(celeryconfig.TASK_QUEUES[celeryconfig.CHAIN[0]], priority)
        assert r.llen(key) == 1, r.keys("*")
        theirs = r.rpop(key)
        messages = ChainMessages.for_client(r)
        ours = messages.build("ref-job.1", priority=priority, nonce=nonce)
        assert ours.queue_key == key
        assert ours.task_id == f"ref-job.1:ingest:{nonce}"
        their_env = json.loads(theirs)  # type: ignore[arg-type]
        their_reply_to = their_env["properties"]["reply_to"]
        want, want_env = normalised(theirs, their_reply_to)  # type: ignore[arg-type]
        got, got_env = normalised(ours.message, messages.reply_to)
        assert got_env == want_env or got == want  # a readable diff first
        assert got == want  # same fields, same order
        # the chain embed: the other five stages, last first, each on its queue, same ids
        embedded = [(s["task"], s["options"]["task_id"], s["options"]["queue"]) for s in got_env["body"][2]["chain"]]
        names = celeryconfig.CHAIN[1:]
        ids = task_ids("ref-job.1", nonce)[1:]
        assert embedded == [(n, i, celeryconfig.TASK_QUEUES[n]) for n, i in zip(names, ids, strict=True)][::-1]

        # the task-sent event (Flower lists a queued task from it)
        got_events = events.wait(1)
        assert len(got_events) == 1 and got_events[0][0] == ours.event_channel
        want_ev, _ = normalised_event(got_events[0][1])
        got_ev, _ = normalised_event(ours.event)
        assert got_ev == want_ev
    finally:
        events.close()


def test_no_event_when_sent_events_are_off() -> None:
    assert ChainMessages(sent_event=False).build("j").event == ""
    assert ChainMessages(sent_event=True).build("j").event != ""


def test_priority_sub_queues_follow_kombu() -> None:
    assert queue_key("cpu", None) == "cpu"
    assert queue_key("cpu", 0) == "cpu"
    assert queue_key("cpu", 7) == "cpu\x06\x167"
    assert queue_key("cpu", 42) == "cpu\x06\x169"  # clamped to 9, as kombu does


def test_record_and_message_are_written_together_once(redis_url: str) -> None:
    url = redis_url.rsplit("/", 1)[0] + f"/{REFERENCE_DB}"
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    try:
        store = JobStore(r, ttl_s=600)
        messages = ChainMessages.for_client(r)
        job_id = f"once-{uuid.uuid4().hex[:6]}"
        created, rec = store.create_or_get(job_id, {"video_url": "s3://b/k"}, message=messages.build(job_id))
        assert created and rec is None
        again, rec = store.create_or_get(job_id, {"video_url": "s3://b/other"}, message=messages.build(job_id))
        assert not again and rec is not None and rec.request == {"video_url": "s3://b/k"} and rec.status == "queued"
        assert r.llen("cpu") == 1
        assert json.loads(r.lindex("cpu", 0))["headers"]["id"].startswith(f"{job_id}:ingest:")  # type: ignore[arg-type]
        h = r.hgetall(f"ecg:job:{job_id}")
        assert set(h) == {"job_id", "status", "progress", "message", "created_at", "updated_at", "request", "attempts",
                          "queue_key", "queue_task_id"}
        assert h["queue_key"] == "cpu" and h["queue_task_id"] == json.loads(r.lindex("cpu", 0))["headers"]["id"]
        assert h["created_at"] == h["updated_at"] and float(h["created_at"]) > 0
        assert r.zscore("ecg:jobs:all", job_id) == float(h["created_at"])
        assert 0 < r.ttl(f"ecg:job:{job_id}") <= 600
        # a queue key of the wrong type: the script fails before it writes anything
        r.set("cpu\x06\x163", "not a list")
        bad = f"bad-{uuid.uuid4().hex[:6]}"
        with pytest.raises(redis.ResponseError):
            store.create(bad, {}, message=messages.build(bad, priority=3))
        assert not r.exists(f"ecg:job:{bad}") and r.zscore("ecg:jobs:all", bad) is None
    finally:
        r.flushdb()


# --- through a real worker ----------------------------------------------------------------------


def ran_stages(r: redis.Redis, job_id: str) -> dict[str, str]:
    """stage -> Celery's stored state, for every task id of the job in the result backend."""
    out: dict[str, str] = {}
    for key in r.scan_iter(f"celery-task-meta-{job_id}:*"):
        meta = json.loads(r.get(key))  # type: ignore[arg-type]
        _, stage, nonce = meta["task_id"].rsplit(":", 2)
        out[f"{stage}:{nonce}"] = meta["status"]
    return out


@pytest.mark.slow  # the session's real worker runs the models
def test_hand_built_messages_run_the_whole_chain_on_a_real_worker(
    api: httpx.Client, worker: Proc, sample_wav: Path, stack_env: dict[str, str]
) -> None:
    from celery import Celery

    wait_for_worker(api, worker)
    with open(sample_wav, "rb") as fh:
        url = api.post("/api/uploads", content=fh.read()).json()["video_url"]
    r = redis.Redis.from_url(stack_env["ECG_REDIS_URL"], decode_responses=True)
    # 1. the shim's path: record and message in one script
    shim_job = f"fast-{uuid.uuid4().hex[:8]}"
    assert api.post("/api/upload-video/process-video", json={"job_id": shim_job, "video_url": url}).status_code == 202
    # 2. send_chain (operator commands) with a priority: a priority sub-queue
    ops_job = f"prio-{uuid.uuid4().hex[:8]}"
    assert JobStore(r).create(ops_job, {"job_id": ops_job, "video_url": url})
    app = Celery("probe")
    app.config_from_object(celeryconfig)
    app.conf.broker_url = app.conf.result_backend = stack_env["ECG_REDIS_URL"]
    first = send_chain(app, {"job_id": ops_job}, priority=3)
    nonce = first.rsplit(":", 1)[1]
    for job_id in (shim_job, ops_job):
        assert wait_job(api, job_id)["status"] == "completed", job_id
    shim_ran = ran_stages(r, shim_job)
    shim_nonce = next(iter(shim_ran)).split(":")[1]
    assert shim_ran == {f"{s}:{shim_nonce}": "SUCCESS" for s in STAGES}
    assert ran_stages(r, ops_job) == {f"{s}:{nonce}": "SUCCESS" for s in STAGES}
    assert int(r.hget(f"ecg:job:{shim_job}", "progress") or 0) == 100  # type: ignore[arg-type]
