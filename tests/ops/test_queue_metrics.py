"""Acceptance: 7 messages in real Redis, 2 InService instances in moto → 7 and 3.5 in CloudWatch."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from celery import Celery

from ecg_audio.settings import Settings
from ops import aws
from ops.queue_metrics import Backlog, publish, publish_queue_metrics, read_backlog, stream_slot_utilization


def _enqueue_like_the_shim(scratch_redis_url: str) -> None:
    """Seven messages the real way: send_task on a Celery app, no worker running."""
    app = Celery("ops-test", broker=scratch_redis_url)
    app.conf.broker_transport_options = {"queue_order_strategy": "priority"}
    try:
        for priority in (None, 0, 9):  # plain list twice, then the priority-9 sub-queue
            app.send_task("ecg.test_hold", args=["job"], queue="model", priority=priority)
        app.send_task("ecg.diarize", args=["job"], queue="model", priority=5)  # step 3 of 0,3,6,9
        app.send_task("ecg.ingest", args=["job"], queue="cpu")
        app.send_task("ecg.features", args=["job"], queue="cpu", priority=7)
        app.send_task("ecg.merge", args=["job"], queue="cpu", priority=3)
    finally:
        app.close()


def _metric_values(settings: Settings, name: str) -> list[float]:
    cloudwatch = aws.client("cloudwatch", settings)
    now = dt.datetime.now(dt.UTC)
    stats = cloudwatch.get_metric_statistics(
        Namespace="ECG/AudioAnalysis",
        MetricName=name,
        Dimensions=[{"Name": "AutoScalingGroupName", "Value": settings.worker_asg_name}],
        StartTime=now - dt.timedelta(minutes=5),
        EndTime=now + dt.timedelta(minutes=5),
        Period=60,
        Statistics=["Maximum"],
    )
    return [p["Maximum"] for p in stats["Datapoints"]]


def test_backlog_counts_priority_subqueues(scratch_redis_url: str, redis_client) -> None:
    _enqueue_like_the_shim(scratch_redis_url)
    keys = sorted(k.decode() for k in redis_client.keys("*") if not k.startswith(b"_kombu"))
    assert "model\x06\x169" in keys and "cpu\x06\x166" in keys  # messages really in sub-queues

    backlog = read_backlog(redis_client)

    assert backlog.waiting == {"model": 4, "cpu": 3}
    assert backlog.total == 7


def test_unacked_messages_count_towards_their_queue(redis_client) -> None:
    # What kombu's QoS.append writes when a worker takes a message with acks_late.
    redis_client.hset("unacked", "tag-1", '[{"body": "..."}, "model", "model"]')
    redis_client.zadd("unacked_index", {"tag-1": 1.0})
    redis_client.hset("unacked", "tag-2", '[{"body": "..."}, "", "celery"]')  # another queue

    assert read_backlog(redis_client).unacked == {"model": 1, "cpu": 0}


def test_publish_7_messages_2_instances(
    scratch_redis_url: str, redis_client, settings: Settings, worker_group: Callable[[int], list[str]]
) -> None:
    _enqueue_like_the_shim(scratch_redis_url)
    worker_group(2)

    published = publish(
        aws.client("cloudwatch", settings), aws.client("autoscaling", settings), read_backlog(redis_client), settings
    )

    assert (published.queue_length, published.in_service_instances) == (7, 2)
    assert _metric_values(settings, "QueueLength") == [7.0]
    assert _metric_values(settings, "BacklogPerInstance") == [3.5]


def test_stream_slots_are_published_beside_the_backlog(settings: Settings, worker_group) -> None:
    worker_group(1)

    publish(
        aws.client("cloudwatch", settings),
        aws.client("autoscaling", settings),
        Backlog(waiting={"model": 0, "cpu": 0}),
        settings,
        stream_slots=(3, 1),
    )

    assert _metric_values(settings, "StreamSlotsBusy") == [3.0]
    assert _metric_values(settings, "StreamSlotsFree") == [1.0]
    # what StreamSlotsTargetTracking follows: the share of slots in use
    assert _metric_values(settings, "StreamSlotUtilization") == [75.0]


def test_no_stream_worker_means_no_stream_pressure() -> None:
    assert stream_slot_utilization(0, 0) == 0.0
    assert stream_slot_utilization(2, 0) == 100.0


def test_no_instances_publishes_the_whole_backlog(settings: Settings, worker_group) -> None:
    worker_group(0)

    published = publish(
        aws.client("cloudwatch", settings),
        aws.client("autoscaling", settings),
        Backlog(waiting={"model": 3, "cpu": 0}),
        settings,
    )

    assert published.backlog_per_instance == 3.0
    assert _metric_values(settings, "BacklogPerInstance") == [3.0]


def test_beat_task_body(scratch_redis_url: str, redis_client, settings: Settings, worker_group, monkeypatch) -> None:
    _enqueue_like_the_shim(scratch_redis_url)
    worker_group(2)
    monkeypatch.setattr(
        "ops.queue_metrics.get_settings", lambda: settings.model_copy(update={"redis_url": scratch_redis_url})
    )
    monkeypatch.setattr("ops.queue_metrics._beat_publisher", None)

    assert publish_queue_metrics() == {"queue_length": 7, "in_service_instances": 2, "backlog_per_instance": 3.5}


def test_task_held_by_a_worker_counts_as_unacked(scratch_redis_url: str, redis_client) -> None:
    """A real worker takes one message under acks_late: it leaves the list for the unacked hash."""
    import threading

    from celery.contrib.testing.worker import start_worker

    app = Celery("ops-test-worker", broker=scratch_redis_url)
    app.conf.update(
        broker_transport_options={"queue_order_strategy": "priority", "priority_steps": list(range(10))},
        task_acks_late=True,
        worker_prefetch_multiplier=1,
    )
    running, release = threading.Event(), threading.Event()

    # not a stage's name: once tasks.pipeline_tasks is imported (by an earlier test), its shared
    # stage tasks join every app at finalize and would replace this one
    @app.task(name="ecg.test_hold")
    def hold(job: str) -> None:
        running.set()
        release.wait(30)

    for priority in (0, 9):
        app.send_task("ecg.test_hold", args=["job"], queue="model", priority=priority)
    try:
        with start_worker(app, pool="solo", concurrency=1, queues=["model"], perform_ping_check=False):
            assert running.wait(20), "the worker never started the task"
            backlog = read_backlog(redis_client)
            release.set()
    finally:
        release.set()
        app.close()

    assert backlog.unacked == {"model": 1, "cpu": 0}
    assert backlog.waiting["model"] == 1
    assert backlog.total == 2


def test_callback_dead_letters_are_counted_and_published(
    scratch_redis_url: str, redis_client, settings: Settings, worker_group: Callable[[int], list[str]]
) -> None:
    from ecg_audio.callbacks import DEAD_PREFIX
    from ops.queue_metrics import QueueMetricsPublisher

    redis_client.rpush(DEAD_PREFIX + "job-a", "{}", "{}")
    redis_client.rpush(DEAD_PREFIX + "job-b", "{}")
    redis_client.rpush("ecg:cb:q:job-c", "{}")  # still being delivered: not a dead letter
    worker_group(1)
    publisher = QueueMetricsPublisher(settings.model_copy(update={"redis_url": scratch_redis_url}))
    try:
        publisher.publish_once()
    finally:
        publisher.close()
    now = dt.datetime.now(dt.UTC)
    points = aws.client("cloudwatch", settings).get_metric_statistics(
        Namespace=settings.metrics_namespace,
        MetricName="CallbackDeadLetters",
        Dimensions=[{"Name": "AutoScalingGroupName", "Value": settings.worker_asg_name}],
        StartTime=now - dt.timedelta(minutes=5),
        EndTime=now + dt.timedelta(minutes=5),
        Period=600,
        Statistics=["Maximum"],
    )["Datapoints"]
    assert [p["Maximum"] for p in points] == [3.0]
