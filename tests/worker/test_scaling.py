from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from ecg_audio.settings import Settings
from ops import aws
from worker import scaling
from worker.scaling import InstanceProtection


def _protected(settings: Settings, instance_id: str) -> bool:
    described = aws.client("autoscaling", settings).describe_auto_scaling_instances(InstanceIds=[instance_id])
    return bool(described["AutoScalingInstances"][0]["ProtectedFromScaleIn"])


def _count_calls(autoscaling) -> list[bool]:
    calls: list[bool] = []
    autoscaling.meta.events.register(
        "before-parameter-build.autoscaling.SetInstanceProtection",
        lambda params, **_: calls.append(params["ProtectedFromScaleIn"]),
    )
    return calls


def test_protected_while_busy_unprotected_when_idle(
    settings: Settings, worker_group: Callable[[int], list[str]]
) -> None:
    instance_id = worker_group(2)[0]
    autoscaling = aws.client("autoscaling", settings)
    calls = _count_calls(autoscaling)
    protection = InstanceProtection(autoscaling, settings.worker_asg_name or "", instance_id)

    protection.task_started()
    assert _protected(settings, instance_id)
    protection.task_started()  # a second task held: no new call
    protection.task_finished()
    assert _protected(settings, instance_id)  # still one task held
    protection.task_finished()
    assert not _protected(settings, instance_id)
    protection.task_finished()  # more ends than starts: stays idle, no call

    assert calls == [True, False]
    assert protection.in_flight == 0


def test_aws_errors_are_logged_not_raised(settings: Settings, worker_group) -> None:
    import boto3
    from botocore.config import Config

    worker_group(1)
    autoscaling = boto3.client(
        "autoscaling",
        region_name="us-east-1",
        endpoint_url=settings.aws_endpoint_url,
        config=Config(retries={"mode": "standard", "max_attempts": 1}),
    )
    protection = InstanceProtection(autoscaling, "no-such-group", "i-00000000")

    protection.task_started()  # moto fails the call for an unknown group
    protection.task_finished()

    assert protection.protected is None


@pytest.fixture
def fresh_process_state() -> Iterator[None]:
    scaling._forget_protection()
    yield
    scaling._forget_protection()


def test_celery_signal_receivers(settings: Settings, worker_group, monkeypatch, fresh_process_state) -> None:
    instance_id = worker_group(1)[0]
    configured = settings.model_copy(update={"scale_in_protection": True, "instance_id": instance_id})
    monkeypatch.setattr(scaling, "get_settings", lambda: configured)
    aws.client("autoscaling", settings).set_instance_protection(
        AutoScalingGroupName=settings.worker_asg_name, InstanceIds=[instance_id], ProtectedFromScaleIn=True
    )  # left behind by a child that was killed mid-task

    scaling.on_worker_process_init()
    assert not _protected(settings, instance_id)
    scaling.on_task_prerun(task_id="t1", task=None)
    assert _protected(settings, instance_id)
    scaling.on_task_postrun(task_id="t1", task=None, state="SUCCESS")
    assert not _protected(settings, instance_id)


def test_disabled_unless_configured(settings: Settings, monkeypatch, fresh_process_state) -> None:
    monkeypatch.setattr(scaling, "get_settings", lambda: settings)  # scale_in_protection defaults to False
    scaling.on_task_prerun()
    assert scaling.instance_protection_from_settings() is None


def test_a_stream_keeps_the_instance_protected_after_the_celery_worker_finishes(
    settings: Settings, worker_group: Callable[[int], list[str]], redis_client
) -> None:
    """The stream worker and the Celery worker share an instance: neither may unprotect it while
    the other holds work."""
    instance_id = worker_group(1)[0]
    group = settings.worker_asg_name or ""
    celery = InstanceProtection(aws.client("autoscaling", settings), group, instance_id, shared=redis_client)
    stream = InstanceProtection(
        aws.client("autoscaling", settings), group, instance_id, shared=redis_client, role="stream"
    )
    celery.reset()
    stream.reset()

    stream.task_started()
    celery.task_started()
    celery.task_finished()
    assert _protected(settings, instance_id), "a live stream still runs on the instance"
    celery.task_started()
    stream.task_finished()
    assert _protected(settings, instance_id), "a job still runs on the instance"
    celery.task_finished()
    assert not _protected(settings, instance_id)

    # a stream worker that restarts while a job runs leaves the job's protection in place
    celery.task_started()
    stream.reset()
    assert _protected(settings, instance_id)
    celery.task_finished()
    assert not _protected(settings, instance_id)


def test_without_redis_each_process_decides_alone(settings: Settings, worker_group) -> None:
    import redis

    instance_id = worker_group(1)[0]
    gone = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    protection = InstanceProtection(
        aws.client("autoscaling", settings), settings.worker_asg_name or "", instance_id, shared=gone
    )
    protection.task_started()
    assert _protected(settings, instance_id)
    protection.task_finished()
    assert not _protected(settings, instance_id)
