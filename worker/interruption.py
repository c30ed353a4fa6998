"""Leave an instance cleanly when AWS takes it: a spot reclaim, a scale-in, a deploy.

Two notices reach a worker through the instance metadata (IMDSv2):

- ``spot/instance-action``: the two-minute spot interruption notice (404 until given);
- ``autoscaling/target-lifecycle-state`` = ``Terminated``: the group is terminating
  this instance and holds it in ``Terminating:Wait`` on the termination lifecycle
  hook (scale-in of an unprotected worker, an instance refresh, a rebalance).

On either, :class:`Drain` runs, in the Celery parent:

1. stop consuming (``cancel_consumer`` for this worker's queues), so no new stage starts here;
2. let the running stage finish, for at most ``interruption_drain_s`` (spot; never past
   the notice's time less ``interruption_margin_s``) or ``lifecycle_drain_s`` (hook).
   A finished stage has already sent the next one to the queue: another worker
   continues from this checkpoint;
3. a stage still running then is handed back at once: its pool child is killed, and
   with ``task_reject_on_worker_lost`` Celery rejects the message with requeue, so it
   is back on its queue in milliseconds, not after the liveness restore
   (``worker_dead_after_s``) or the visibility timeout. Only that stage runs again;
   the ones before it are checkpoints in the workspace. A hand-back is not a crash: it does not
   count towards the ``max_stage_deliveries`` that fail a job with STAGE_CRASHED;
4. complete the termination lifecycle action (``CONTINUE``) when a hook name is set,
   so the group terminates the instance now instead of at the hook's timeout;
5. warm shutdown (SIGTERM to the parent): nothing is held any more, so it is quick.

Wiring (the worker app does this when ``ECG_INTERRUPTION_WATCH`` is true, see
:func:`connect_celery_signals`)::

    worker_ready    -> start the watcher thread in the parent
    worker_shutdown -> stop it
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import structlog

from ecg_audio.settings import Settings, get_settings

log = structlog.get_logger("ecg.interruption")

SPOT_ACTION_PATH = "/latest/meta-data/spot/instance-action"
LIFECYCLE_STATE_PATH = "/latest/meta-data/autoscaling/target-lifecycle-state"


@dataclass(frozen=True)
class Notice:
    kind: Literal["spot", "lifecycle"]
    seconds_left: float | None  # until AWS takes the instance; None = the hook waits for us
    detail: str


def read_notice(imds: Any) -> Notice | None:
    """The pending notice in the instance metadata, or None.

    Args:
        imds: an :class:`ops.aws.Imds` (``get(path) -> str | None``).
    """
    action = imds.get(SPOT_ACTION_PATH)
    if action:
        try:
            parsed = json.loads(action)
            when = datetime.strptime(parsed["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            left: float | None = max(0.0, (when - datetime.now(UTC)).total_seconds())
            kind = str(parsed.get("action", "terminate"))
        except (ValueError, KeyError, TypeError):
            # a notice we cannot parse is still a notice: AWS promises two minutes
            left, kind = 120.0, "unparsed"
        if kind in ("terminate", "stop", "hibernate", "unparsed"):
            return Notice("spot", left, f"spot {kind}")
    state = imds.get(LIFECYCLE_STATE_PATH)
    if state and state.strip() == "Terminated":
        return Notice("lifecycle", None, "target lifecycle state Terminated")
    return None


class LifecycleAction:
    """Completes this instance's termination lifecycle action; heartbeats it while draining."""

    def __init__(self, autoscaling: Any, asg_name: str, hook_name: str, instance_id: str) -> None:
        self._autoscaling = autoscaling
        self.asg_name = asg_name
        self.hook_name = hook_name
        self.instance_id = instance_id

    def heartbeat(self) -> None:
        try:
            self._autoscaling.record_lifecycle_action_heartbeat(
                LifecycleHookName=self.hook_name, AutoScalingGroupName=self.asg_name, InstanceId=self.instance_id
            )
        except Exception as e:  # the hook may not be waiting (a spot reclaim without scale-in): harmless
            log.info("lifecycle_heartbeat_failed", error=str(e))

    def complete(self) -> bool:
        try:
            self._autoscaling.complete_lifecycle_action(
                LifecycleHookName=self.hook_name,
                AutoScalingGroupName=self.asg_name,
                InstanceId=self.instance_id,
                LifecycleActionResult="CONTINUE",
            )
        except Exception as e:  # no action pending, or AWS unreachable: the hook's timeout still ends it
            log.warning("lifecycle_complete_failed", hook=self.hook_name, error=str(e))
            return False
        log.info("lifecycle_completed", hook=self.hook_name, instance_id=self.instance_id)
        return True


@dataclass
class DrainResult:
    notice: Notice
    waited_s: float
    handed_back: int


class Drain:
    """The steps of the module docstring, with the Celery- and AWS-specific parts injected.

    Args:
        stop_consuming: stop taking messages.
        busy: whether a stage is running.
        hand_back: put the running stage's message back on its queue now; returns how many.
        shutdown: begin the warm shutdown.
        lifecycle: the lifecycle action to complete, or None.
    """

    def __init__(
        self,
        *,
        stop_consuming: Callable[[], None],
        busy: Callable[[], bool],
        hand_back: Callable[[], int],
        shutdown: Callable[[], None],
        lifecycle: LifecycleAction | None,
        spot_drain_s: float,
        spot_margin_s: float,
        lifecycle_drain_s: float,
        poll_s: float = 0.2,
        heartbeat_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stop_consuming = stop_consuming
        self._busy = busy
        self._hand_back = hand_back
        self._shutdown = shutdown
        self._lifecycle = lifecycle
        self._spot_drain_s = spot_drain_s
        self._spot_margin_s = spot_margin_s
        self._lifecycle_drain_s = lifecycle_drain_s
        self._poll_s = poll_s
        self._heartbeat_s = heartbeat_s
        self._clock = clock

    def budget_s(self, notice: Notice) -> float:
        """How long the running stage may go on."""
        if notice.kind == "lifecycle":
            return self._lifecycle_drain_s
        budget = self._spot_drain_s
        if notice.seconds_left is not None:
            budget = min(budget, notice.seconds_left - self._spot_margin_s)
        return max(0.0, budget)

    def run(self, notice: Notice) -> DrainResult:
        start = self._clock()
        log.warning("interruption_notice", kind=notice.kind, detail=notice.detail, seconds_left=notice.seconds_left)
        try:
            self._stop_consuming()
        except Exception:  # keep going: handing back and shutting down still matter
            log.exception("stop_consuming_failed")
        deadline = start + self.budget_s(notice)
        last_heartbeat = start
        while self._busy() and self._clock() < deadline:
            if self._lifecycle is not None and self._clock() - last_heartbeat >= self._heartbeat_s:
                self._lifecycle.heartbeat()
                last_heartbeat = self._clock()
            time.sleep(self._poll_s)
        handed_back = 0
        if self._busy():
            handed_back = self._hand_back()
            log.warning("stage_handed_back", count=handed_back, after_s=round(self._clock() - start, 1))
            # the parent notices the killed child and requeues within moments; wait for that
            settle = self._clock() + 30.0
            while self._busy() and self._clock() < settle:
                time.sleep(self._poll_s)
        if self._lifecycle is not None:
            self._lifecycle.complete()
        result = DrainResult(notice, round(self._clock() - start, 2), handed_back)
        log.warning("drained", waited_s=result.waited_s, handed_back=handed_back)
        self._shutdown()
        return result


class Watcher:
    """Polls the instance metadata on a daemon thread; runs ``drain`` once on the first notice."""

    def __init__(self, imds: Any, drain: Drain, *, poll_s: float) -> None:
        self._imds = imds
        self._drain = drain
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="interruption-watcher", daemon=True)
        self.result: DrainResult | None = None

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                notice = read_notice(self._imds)
            except (OSError, http.client.HTTPException) as e:
                log.debug("imds_poll_failed", error=str(e))  # off EC2, or a blip: ask again next time
                notice = None
            if notice is not None:
                self.result = self._drain.run(notice)
                return
            self._stop.wait(self._poll_s)


# -- Celery wiring -----------------------------------------------------------------------


def _celery_drain(app: Any, consumer: Any, settings: Settings, lifecycle: LifecycleAction | None) -> Drain:
    from celery.worker import state

    hostname = consumer.hostname
    queues = [q.name for q in app.amqp.queues.consume_from.values()]

    def stop_consuming() -> None:
        # through the worker's own control channel: the consumer belongs to its event loop thread
        for queue in queues:
            app.control.cancel_consumer(queue, destination=[hostname], reply=True, timeout=5.0)

    def busy() -> bool:
        return bool(state.active_requests)

    def hand_back() -> int:
        killed = 0
        for request in list(state.active_requests):
            pid = getattr(request, "worker_pid", None)
            if not pid:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed += 1
            _wait_gone(pid)
            _handed_back(settings, request)
        return killed

    def shutdown() -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    return Drain(
        stop_consuming=stop_consuming,
        busy=busy,
        hand_back=hand_back,
        shutdown=shutdown,
        lifecycle=lifecycle,
        spot_drain_s=settings.interruption_drain_s,
        spot_margin_s=settings.interruption_margin_s,
        lifecycle_drain_s=settings.lifecycle_drain_s,
    )


def _wait_gone(pid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def _handed_back(settings: Settings, request: Any) -> None:
    """The killed stage was handed back, not crashed: its delivery is taken back from the count that
    fails a job with STAGE_CRASHED after ``max_stage_deliveries``, and its lease is freed now, so the
    worker that takes the requeued message runs it at once instead of waiting for the TTL. Safe: the
    lease's holder, the pool child, is dead."""
    import redis

    from tasks.lifecycle import hand_back

    try:
        args = request.args or []
        job_id = args[0]["job_id"] if args and isinstance(args[0], dict) else None
        stage = str(request.name).removeprefix("ecg.")
    except Exception:  # an odd message: the lease lapses on its own within its TTL
        return
    if not job_id:
        return
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        hand_back(client, str(job_id), stage)
    except redis.RedisError as e:
        log.warning("hand_back_not_recorded", error=str(e))
    finally:
        client.close()


def lifecycle_from_settings(settings: Settings) -> LifecycleAction | None:
    if not (settings.lifecycle_hook_name and settings.worker_asg_name):
        return None
    from ops import aws

    instance_id = aws.instance_id(settings)
    if not instance_id:
        log.warning("lifecycle_hook_disabled", reason="no instance id (ECG_INSTANCE_ID or IMDSv2)")
        return None
    return LifecycleAction(
        aws.client("autoscaling", settings), settings.worker_asg_name, settings.lifecycle_hook_name, instance_id
    )


_state: dict[str, Watcher] = {}


def on_worker_ready(sender: Any = None, **_: Any) -> None:
    from ops import aws

    settings = get_settings()
    try:
        imds = aws.imds(settings)
    except ValueError as e:
        log.warning("interruption_watch_disabled", error=str(e))
        return
    drain = _celery_drain(sender.app, sender, settings, lifecycle_from_settings(settings))
    _state["watcher"] = Watcher(imds, drain, poll_s=settings.interruption_poll_s).start()
    log.info("interruption_watch_started", endpoint=imds.endpoint)


def on_worker_shutdown(**_: Any) -> None:
    watcher = _state.pop("watcher", None)
    if watcher is not None:
        watcher.stop()


def connect_celery_signals() -> None:
    """Connect the receivers above; call once where the worker app is built."""
    from celery import signals

    signals.worker_ready.connect(on_worker_ready, weak=False)
    signals.worker_shutdown.connect(on_worker_shutdown, weak=False)
