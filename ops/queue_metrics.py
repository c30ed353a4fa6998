"""Queue depth for the autoscaler: Redis backlog → CloudWatch ``BacklogPerInstance``.

The worker Auto Scaling group tracks a target for ``BacklogPerInstance`` (see
``infra/README.md``). This module reads the backlog straight from the Celery broker
(kombu's Redis transport) and publishes it once per ``metrics_interval_s``.

Where kombu keeps messages (kombu 5.x, ``kombu/transport/redis.py``):

* each queue is a Redis list; a message with priority ``p`` goes to the list
  ``f"{queue}\\x06\\x16{p}"`` (``Channel.sep``) where ``p`` is the priority step it maps
  to, and to the plain ``queue`` list when that step is 0;
* a message a worker has taken but not yet acknowledged (``task_acks_late``: the
  task is running) sits in the hash ``unacked`` as ``[message, exchange,
  routing_key]``, indexed by time in the sorted set ``unacked_index``.

Backlog = waiting messages + unacknowledged ones, i.e. all work in the system that a
worker has not finished. Run the publisher as its own process (``ecg-audio metrics``)
next to Redis, not as a task on the worker queues: a task on a worker queue waits
behind the very backlog it should report.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from ecg_audio import live
from ecg_audio.queues import PRIORITY_STEPS, QUEUES, priority_queue_keys
from ecg_audio.settings import Settings, get_settings

log = structlog.get_logger(__name__)

UNACKED_KEY = "unacked"
DEFAULT_QUEUES = QUEUES


@dataclass(frozen=True)
class Backlog:
    """Messages not yet finished, per queue."""

    waiting: dict[str, int] = field(default_factory=dict)  # in the lists, not yet taken
    unacked: dict[str, int] = field(default_factory=dict)  # taken by a worker, not yet acknowledged

    @property
    def total(self) -> int:
        return sum(self.waiting.values()) + sum(self.unacked.values())


@dataclass(frozen=True)
class PublishedMetrics:
    queue_length: int
    in_service_instances: int
    backlog_per_instance: float


def read_backlog(
    redis_client: Any,
    queues: Iterable[str] = DEFAULT_QUEUES,
    *,
    key_prefix: str = "",
) -> Backlog:
    """Count waiting and unacknowledged messages of ``queues`` in the broker.

    Args:
        redis_client: a ``redis.Redis`` on the broker database.
        queues: Celery queue names.
        key_prefix: kombu's ``global_keyprefix`` transport option, if one is set.
    """
    queues = tuple(queues)
    with redis_client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for key in priority_queue_keys(queue, key_prefix=key_prefix):
                pipe.llen(key)
        pipe.hvals(f"{key_prefix}{UNACKED_KEY}")
        results = pipe.execute()
    raw_unacked = results.pop()
    steps = len(PRIORITY_STEPS)  # priority_queue_keys gives one key per step
    waiting = {queue: int(sum(results[i * steps : (i + 1) * steps])) for i, queue in enumerate(queues)}

    # The unacked hash is shared by every queue on this Redis database; attribute each
    # entry by its routing key (Celery routes a task to queue Q with routing key Q).
    unacked = dict.fromkeys(queues, 0)
    for raw in raw_unacked:
        try:
            _message, exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue
        for name in (routing_key, exchange):
            if name in unacked:
                unacked[name] += 1
                break
    return Backlog(waiting=waiting, unacked=unacked)


def in_service_instances(autoscaling: Any, asg_name: str) -> int:
    """Instances of the group in the ``InService`` lifecycle state."""
    groups = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[asg_name])["AutoScalingGroups"]
    if not groups:
        raise LookupError(f"Auto Scaling group {asg_name!r} not found; check ECG_WORKER_ASG_NAME and the region")
    return sum(1 for i in groups[0].get("Instances", []) if i.get("LifecycleState") == "InService")


def dead_letters(client: Any) -> int:
    """Callback events given up on (every attempt failed), over all jobs still in Redis."""
    from ecg_audio.callbacks import DEAD_PREFIX

    total = 0
    for key in client.scan_iter(match=DEAD_PREFIX + "*", count=500):
        total += int(client.llen(key))
    return total


def publish(
    cloudwatch: Any,
    asg: Any,
    backlog: Backlog,
    settings: Settings | None = None,
    *,
    callback_dead_letters: int | None = None,
    stream_slots: tuple[int, int] | None = None,
) -> PublishedMetrics:
    """Put ``QueueLength``, ``BacklogPerInstance`` (and ``CallbackDeadLetters``; with ``stream_slots``,
    the live stream workers' ``StreamSlotsBusy``, ``StreamSlotsFree`` and ``StreamSlotUtilization``,
    the second scaling metric) for the worker group.

    With no instance in service the backlog itself is published as the per-instance
    value, so any backlog above the target still scales out from zero.

    Args:
        cloudwatch: a boto3 CloudWatch client.
        asg: a boto3 Auto Scaling client.
        backlog: from :func:`read_backlog`.
        settings: for the group name and namespace.
    """
    settings = settings or get_settings()
    asg_name = settings.worker_asg_name
    if not asg_name:
        raise ValueError("ECG_WORKER_ASG_NAME is not set: the metric needs the worker group as its dimension")
    instances = in_service_instances(asg, asg_name)
    total = backlog.total
    per_instance = total / instances if instances else float(total)
    dimensions = [{"Name": "AutoScalingGroupName", "Value": asg_name}]
    cloudwatch.put_metric_data(
        Namespace=settings.metrics_namespace,
        MetricData=[
            {"MetricName": "QueueLength", "Dimensions": dimensions, "Value": float(total), "Unit": "Count"},
            {
                "MetricName": "BacklogPerInstance",
                "Dimensions": dimensions,
                "Value": per_instance,
                "Unit": "Count",
            },
            *(
                []
                if callback_dead_letters is None
                else [
                    {
                        "MetricName": "CallbackDeadLetters",
                        "Dimensions": dimensions,
                        "Value": float(callback_dead_letters),
                        "Unit": "Count",
                    }
                ]
            ),
            *([] if stream_slots is None else _stream_slot_metrics(stream_slots, dimensions)),
        ],
    )
    published = PublishedMetrics(total, instances, per_instance)
    log.info(
        "queue_metrics_published",
        asg=asg_name,
        queue_length=total,
        waiting=backlog.waiting,
        unacked=backlog.unacked,
        in_service=instances,
        backlog_per_instance=per_instance,
    )
    return published


def stream_slot_utilization(busy: int, free: int) -> float:
    """Percent of the stream slots in use: what the group's second target tracking policy
    follows (``StreamSlotsTargetTracking``), so it grows for live streams as for queued jobs.
    0 with no stream worker alive: nothing to say about streams then."""
    total = busy + free
    return 100.0 * busy / total if total else 0.0


def _stream_slot_metrics(stream_slots: tuple[int, int], dimensions: list[dict[str, str]]) -> list[dict[str, Any]]:
    busy, free = stream_slots
    counts = [
        {"MetricName": name, "Dimensions": dimensions, "Value": float(value), "Unit": "Count"}
        for name, value in (("StreamSlotsBusy", busy), ("StreamSlotsFree", free))
    ]
    utilization = {
        "MetricName": "StreamSlotUtilization",
        "Dimensions": dimensions,
        "Value": stream_slot_utilization(busy, free),
        "Unit": "Percent",
    }
    return [*counts, utilization]


class QueueMetricsPublisher:
    """Holds the Redis and AWS clients between publications."""

    def __init__(self, settings: Settings | None = None, queues: Iterable[str] = DEFAULT_QUEUES) -> None:
        import redis

        from ops import aws

        self.settings = settings or get_settings()
        self.queues = tuple(queues)
        self._redis = redis.Redis.from_url(self.settings.redis_url, socket_timeout=10)
        self._cloudwatch = aws.client("cloudwatch", self.settings)
        self._autoscaling = aws.client("autoscaling", self.settings)

    def publish_once(self) -> PublishedMetrics:
        backlog = read_backlog(self._redis, self.queues)
        return publish(
            self._cloudwatch,
            self._autoscaling,
            backlog,
            self.settings,
            callback_dead_letters=dead_letters(self._redis),
            stream_slots=live.slot_counts(self._redis),
        )

    def close(self) -> None:
        self._redis.close()


_beat_publisher: QueueMetricsPublisher | None = None
_beat_lock = threading.Lock()


def publish_queue_metrics() -> dict[str, float]:
    """Body for a Celery beat task: publish once, return what was published.

    Keeps its clients between calls. If you wire it as a task, route it to a queue
    that no GPU job waits in and give it ``expires`` of one interval, otherwise the
    metric stops exactly when the backlog grows.
    """
    global _beat_publisher
    with _beat_lock:
        if _beat_publisher is None:
            _beat_publisher = QueueMetricsPublisher()
        published = _beat_publisher.publish_once()
    return {
        "queue_length": published.queue_length,
        "in_service_instances": published.in_service_instances,
        "backlog_per_instance": published.backlog_per_instance,
    }


def run_forever(
    interval_s: float | None = None,
    *,
    settings: Settings | None = None,
    stop_event: threading.Event | None = None,
) -> None:
    """Publish every ``interval_s`` (default ``metrics_interval_s``) until ``stop_event`` is set.

    The body of ``ecg-audio metrics``. A failed round is logged and the loop goes on:
    a gap in the metric is better than a dead publisher.
    """
    settings = settings or get_settings()
    interval = interval_s if interval_s is not None else settings.metrics_interval_s
    stop = stop_event or threading.Event()
    publisher = QueueMetricsPublisher(settings)
    log.info("queue_metrics_started", interval_s=interval, asg=settings.worker_asg_name)
    try:
        while not stop.is_set():
            started = time.monotonic()
            try:
                publisher.publish_once()
            except Exception as e:  # any failure: log it and try again next round
                log.warning("queue_metrics_failed", error=str(e), error_type=type(e).__name__)
            stop.wait(max(0.0, interval - (time.monotonic() - started)))
    finally:
        publisher.close()
