"""The next stage is published by the delivery that holds the stage's lease, in the same Redis step
that checks the lease (issue 23): the message is the one Celery's worker would have sent after the
task returned, and a delivery whose lease lapsed and was taken over publishes nothing."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis

import celeryconfig
from ecg_audio.chain import ChainMessages, next_stage_commands, publish_next

REFERENCE_DB = 13  # a database no worker reads


@pytest.fixture
def worker_app(redis_url: str) -> Iterator[tuple[Any, redis.Redis]]:
    """An app as a worker has it: the project's settings and the stage tasks registered."""
    from celery import Celery

    import tasks.pipeline_tasks  # noqa: F401  (the shared stage tasks join the app at finalize)

    url = redis_url.rsplit("/", 1)[0] + f"/{REFERENCE_DB}"
    app = Celery("publish-next-test")
    app.config_from_object(celeryconfig)
    app.conf.broker_url = app.conf.result_backend = url
    app.finalize()
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    yield app, r
    r.flushdb()
    app.close()


def _ingest_request(app: Any, job: str) -> SimpleNamespace:
    """The request of the first task of a job's chain, as the worker sees it."""
    msg = json.loads(ChainMessages(sent_event=False).build(job).message)
    args, kwargs, embed = json.loads(base64.b64decode(msg["body"]))
    return SimpleNamespace(
        id=msg["headers"]["id"], root_id=msg["headers"]["root_id"], chain=embed["chain"], delivery_info={}
    )


def _normalised(raw: str) -> dict[str, Any]:
    env = json.loads(raw)
    env["properties"].pop("delivery_tag")
    env["body"] = json.loads(base64.b64decode(env["body"]))
    return env


def test_the_next_stage_message_is_the_one_celery_sends(worker_app: tuple[Any, redis.Redis]) -> None:
    from celery import signature

    app, r = worker_app
    job = f"pn-{uuid.uuid4().hex[:8]}"
    request = _ingest_request(app, job)
    commands = next_stage_commands(app, request, {"job_id": job})
    # captured, not run (kombu declares the queue's binding on the way, as it does on every publish)
    assert [k for k in r.keys("*") if not k.startswith("_kombu.binding")] == []
    assert [c[0] for c in commands] == ["lpush", "publish"], commands  # the message, its task-sent event
    queue = celeryconfig.TASK_QUEUES[celeryconfig.CHAIN[1]]
    assert commands[0][1][0] == queue
    ours = _normalised(commands[0][1][1])
    # what celery.app.trace does after the task returns
    chain = request.chain
    signature(chain[-1], app=app).apply_async(
        ({"job_id": job},), chain=chain[:-1], parent_id=request.id, root_id=request.root_id, priority=None
    )
    theirs = _normalised(r.rpop(queue))  # type: ignore[arg-type]
    assert ours == theirs
    assert ours["headers"]["id"] == request.chain[-1]["options"]["task_id"]
    assert ours["headers"]["parent_id"] == request.id and ours["body"][0] == [{"job_id": job}]
    assert len(ours["body"][2]["chain"]) == len(celeryconfig.CHAIN) - 2


def test_only_the_lease_holder_publishes_and_only_once(worker_app: tuple[Any, redis.Redis]) -> None:
    app, r = worker_app
    job = f"pn-{uuid.uuid4().hex[:8]}"
    record, lease = f"ecg:job:{job}", f"ecg:lease:{job}:ingest"
    r.hset(record, mapping={"job_id": job, "status": "processing"})
    commands = next_stage_commands(app, _ingest_request(app, job), {"job_id": job})
    queue = commands[0][1][0]
    kw = {"lease_key": lease, "record_key": record, "stage": "ingest", "next_stage": "diarize"}
    r.set(lease, "the-other-delivery", px=30_000)  # this delivery's lease lapsed and was taken over
    assert publish_next(r, commands, token="this-delivery", **kw) == 0
    assert r.llen(queue) == 0 and not r.hexists(record, "published:ingest")
    r.set(lease, "this-delivery", px=30_000)
    assert publish_next(r, commands, token="this-delivery", **kw) == 1
    assert r.llen(queue) == 1 and r.hget(record, "publishes:ingest") == "1"
    # a second delivery of the finished stage (a restored copy), holding the lease after the first
    assert publish_next(r, commands, token="this-delivery", **kw) == 2
    assert r.llen(queue) == 1 and r.hget(record, "publishes:ingest") == "1"


def test_a_broker_error_while_publishing_hands_the_message_back(
    stage_redis_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis gone as the stage publishes its successor: the message goes back to its queue (Reject,
    requeue), the job is not failed; the checkpoint makes the redelivery publish at once."""
    from celery.exceptions import Reject
    from kombu.exceptions import OperationalError

    from ecg_audio.retry import Backoff
    from ecg_audio.settings import get_settings
    from media_io.workspace import Workspace
    from tasks import context, lifecycle
    from tasks.pipeline_tasks import STAGE_TASKS

    monkeypatch.setenv("ECG_REDIS_URL", stage_redis_url)
    monkeypatch.setenv("ECG_WORKSPACE_ROOT", str(tmp_path / "ws"))
    get_settings.cache_clear()
    context.job_store.cache_clear()
    context.set_model_provider(lambda: SimpleNamespace(device="cpu"))  # type: ignore[arg-type, return-value]
    monkeypatch.setattr(lifecycle, "REDIS_AWAY", Backoff(0.0, 0.0, jitter=0.0))

    def gone(*a: Any, **k: Any) -> Any:
        raise OperationalError("Error 111 connecting to 127.0.0.1. Connection refused.")

    monkeypatch.setattr(lifecycle, "next_stage_commands", gone)
    job = f"pn-{uuid.uuid4().hex[:8]}"
    store = context.job_store()
    assert store.create(job, {"job_id": job, "video_url": "https://example.com/a.wav"})
    Workspace.open(tmp_path / "ws", job).write_json("ingest.json", {"duration": 1.0})
    task = STAGE_TASKS["ingest"]
    task.push_request(id=f"{job}:ingest:x", chain=_ingest_request(None, job).chain)
    try:
        with pytest.raises(Reject):
            task.run_stage_task("ingest", {"job_id": job})
    finally:
        task.pop_request()
        get_settings.cache_clear()
        context.job_store.cache_clear()
    rec = store.get(job)
    assert rec is not None and rec.status != "failed", rec
