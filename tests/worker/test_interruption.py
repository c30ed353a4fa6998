"""worker/interruption.py: notices read from a fake IMDSv2, the drain order, the lifecycle hook on moto.

moto 5.2 keeps lifecycle hooks (PutLifecycleHook, DescribeLifecycleHooks) but does
not implement CompleteLifecycleAction or RecordLifecycleActionHeartbeat. Those two
calls still go through botocore's request validation against the real service
model, then a ``before-call`` handler records them and answers as AWS does (an
empty 200), after checking that the hook exists in moto and names this group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bench.fake_imds import FakeImds
from ecg_audio.settings import Settings
from ops import aws
from tests.helpers import make_settings, wait_for
from worker.interruption import SPOT_ACTION_PATH, Drain, LifecycleAction, Notice, Watcher, read_notice

HOOK = "ecg-drain"


@pytest.fixture
def fake_imds() -> Iterator[FakeImds]:
    imds = FakeImds("i-0spot")
    yield imds
    imds.close()


def _imds(fake: FakeImds) -> aws.Imds:
    return aws.imds(make_settings(imds_endpoint=fake.endpoint, imds_timeout_s=2.0))


def test_no_notice_reads_none(fake_imds: FakeImds) -> None:
    assert read_notice(_imds(fake_imds)) is None
    assert fake_imds.tokens, "IMDSv2: a token must be asked for first"


def test_spot_notice_is_read_with_its_time(fake_imds: FakeImds) -> None:
    fake_imds.interrupt(in_s=120)
    notice = read_notice(_imds(fake_imds))
    assert notice is not None and notice.kind == "spot"
    assert notice.seconds_left is not None and 100 <= notice.seconds_left <= 121


def test_lifecycle_termination_is_read(fake_imds: FakeImds) -> None:
    fake_imds.terminate()
    assert read_notice(_imds(fake_imds)) == Notice("lifecycle", None, "target lifecycle state Terminated")


def test_instance_id_through_the_same_client(fake_imds: FakeImds) -> None:
    assert aws.instance_id(make_settings(instance_id=None, imds_endpoint=fake_imds.endpoint)) == "i-0spot"


class _Stage:
    """A running stage that ends when told, or is handed back."""

    def __init__(self) -> None:
        self.running = True
        self.events: list[str] = []

    def busy(self) -> bool:
        return self.running

    def hand_back(self) -> int:
        self.events.append("hand_back")
        self.running = False
        return 1

    def finish(self) -> None:
        self.events.append("stage_finished")
        self.running = False


def _drain(stage: _Stage, lifecycle: LifecycleAction | None = None, **budgets: float) -> Drain:
    return Drain(
        stop_consuming=lambda: stage.events.append("stop_consuming"),
        busy=stage.busy,
        hand_back=stage.hand_back,
        shutdown=lambda: stage.events.append("shutdown"),
        lifecycle=lifecycle,
        spot_drain_s=budgets.get("spot_drain_s", 90.0),
        spot_margin_s=budgets.get("spot_margin_s", 20.0),
        lifecycle_drain_s=budgets.get("lifecycle_drain_s", 3000.0),
        poll_s=0.02,
    )


def test_spot_budget_never_runs_past_the_notice() -> None:
    drain = _drain(_Stage(), spot_drain_s=90.0, spot_margin_s=20.0)
    assert drain.budget_s(Notice("spot", 120.0, "")) == 90.0
    assert drain.budget_s(Notice("spot", 50.0, "")) == 30.0
    assert drain.budget_s(Notice("spot", 5.0, "")) == 0.0
    assert drain.budget_s(Notice("lifecycle", None, "")) == 3000.0


def test_watcher_drains_a_stage_that_finishes_in_time(fake_imds: FakeImds) -> None:
    stage = _Stage()
    watcher = Watcher(_imds(fake_imds), _drain(stage), poll_s=0.05).start()
    wait_for(lambda: fake_imds.gets.count(SPOT_ACTION_PATH) >= 3, what="the watcher polling the spot notice")
    assert stage.events == []  # polled, no notice: nothing happens
    fake_imds.interrupt(in_s=120)
    wait_for(lambda: "stop_consuming" in stage.events)
    stage.finish()
    watcher.join(10)
    assert stage.events == ["stop_consuming", "stage_finished", "shutdown"]
    assert watcher.result is not None and watcher.result.handed_back == 0


def test_a_stage_past_the_budget_is_handed_back_before_shutdown(fake_imds: FakeImds) -> None:
    stage = _Stage()
    fake_imds.interrupt(in_s=21)  # 1 s of budget once the 20 s margin is kept
    watcher = Watcher(_imds(fake_imds), _drain(stage), poll_s=0.05).start()
    watcher.join(30)
    assert stage.events == ["stop_consuming", "hand_back", "shutdown"]
    assert watcher.result is not None and watcher.result.handed_back == 1


# -- the lifecycle hook on moto ------------------------------------------------------------


class _LifecycleCalls:
    """Records CompleteLifecycleAction/RecordLifecycleActionHeartbeat, which moto lacks."""

    def __init__(self, autoscaling: Any) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._autoscaling = autoscaling
        autoscaling.meta.events.register("before-call.autoscaling.CompleteLifecycleAction", self._complete)
        autoscaling.meta.events.register("before-call.autoscaling.RecordLifecycleActionHeartbeat", self._heartbeat)

    def _check(self, params: dict[str, Any]) -> None:
        hooks = self._autoscaling.describe_lifecycle_hooks(
            AutoScalingGroupName=params["AutoScalingGroupName"], LifecycleHookNames=[params["LifecycleHookName"]]
        )["LifecycleHooks"]
        assert [h["LifecycleTransition"] for h in hooks] == ["autoscaling:EC2_INSTANCE_TERMINATING"]

    def _complete(self, params: dict[str, Any], **_: Any) -> tuple[Any, dict[str, Any]]:
        self._check(params["body"])
        self.calls.append(("complete", {k: v for k, v in params["body"].items() if k not in ("Action", "Version")}))
        return _ok()

    def _heartbeat(self, params: dict[str, Any], **_: Any) -> tuple[Any, dict[str, Any]]:
        self._check(params["body"])
        self.calls.append(("heartbeat", dict(params["body"])))
        return _ok()


def _ok() -> tuple[Any, dict[str, Any]]:
    class _Http:
        status_code = 200
        headers: dict[str, str] = {}

    return _Http(), {"ResponseMetadata": {"HTTPStatusCode": 200}}


def test_lifecycle_action_completes_only_after_the_running_stage_ended(
    settings: Settings, worker_group: Callable[[int], list[str]], fake_imds: FakeImds
) -> None:
    (instance,) = worker_group(1)
    autoscaling = aws.client("autoscaling", settings)
    assert settings.worker_asg_name
    autoscaling.put_lifecycle_hook(
        LifecycleHookName=HOOK,
        AutoScalingGroupName=settings.worker_asg_name,
        LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
        HeartbeatTimeout=3600,
        DefaultResult="CONTINUE",
    )
    recorded = _LifecycleCalls(autoscaling)
    lifecycle = LifecycleAction(autoscaling, settings.worker_asg_name, HOOK, instance)
    stage = _Stage()
    drain = _drain(stage, lifecycle)
    drain._heartbeat_s = 0.1  # heartbeats while waiting, at test speed
    watcher = Watcher(_imds(fake_imds), drain, poll_s=0.05).start()

    fake_imds.terminate()  # scale-in or instance refresh: the hook holds the instance
    wait_for(lambda: "stop_consuming" in stage.events)
    wait_for(lambda: any(kind == "heartbeat" for kind, _ in recorded.calls))
    assert all(kind != "complete" for kind, _ in recorded.calls), "completed while the stage still ran"
    stage.finish()
    watcher.join(10)

    completes = [body for kind, body in recorded.calls if kind == "complete"]
    assert completes == [
        {
            "LifecycleHookName": HOOK,
            "AutoScalingGroupName": settings.worker_asg_name,
            "InstanceId": instance,
            "LifecycleActionResult": "CONTINUE",
        }
    ]
    assert stage.events == ["stop_consuming", "stage_finished", "shutdown"]
