"""Keep the Auto Scaling group from terminating a worker that holds a task.

Target tracking scales in by terminating instances of its choosing. A worker holding
a task protects its own instance from scale-in (``SetInstanceProtection``) and drops
the protection when it holds none, so scale-in only ever removes idle workers.

Shutdown. A spot notice or a termination lifecycle hook (scale-in, deploy) is seen
first by ``worker/interruption.py``, which drains the worker and hands a running stage
back at once. Without a notice, ``docker stop`` sends SIGTERM and Celery does a *warm shutdown*: it stops
taking messages, lets the running task finish, then exits. The container's stop
timeout (``--stop-timeout`` in the launch template's user data, ``stop_grace_period``
in ``docker-compose.yml``; 15 minutes) bounds that wait; past it Docker sends SIGKILL.
A task killed that way was never acknowledged (``task_acks_late``), but kombu only
hands it out again after the broker's ``visibility_timeout`` (hours here, longer
than the longest stage). Celery >= 5.5 can do better: with the environment variable
``REMAP_SIGTERM=SIGQUIT`` and ``worker_soft_shutdown_timeout`` set a minute below
the stop timeout, SIGTERM waits that long for the task, then cancels it and puts the
message straight back on its Redis queue for another worker. Set both together;
``REMAP_SIGTERM`` alone makes SIGTERM cancel the running task at once.

Two processes on one instance. The stream worker (``worker/stream.py``, live streams) runs
beside the Celery worker on the same instance and holds work of its own. Each process is a
*role*; the roles holding work are a Redis set per instance (``keys.PROTECTION``), and whoever
changes it does so, and sets the protection the set now calls for, under one Redis lock: the
Celery worker finishing a job leaves the instance protected while a stream runs. Without Redis
each process falls back to its own count, as a lone worker does.

Protection cannot cover one race: a task taken in the moment between losing
protection and being chosen for termination. That task is handed back by the
shutdown above.

Wiring (the worker app does this, see :func:`connect_celery_signals`)::

    worker_process_init  -> on_worker_process_init   (clears a stale protection)
    task_prerun          -> on_task_prerun           (+1 task held)
    task_postrun         -> on_task_postrun          (-1 task held)
"""

from __future__ import annotations

import threading
from typing import Any

import structlog

from ecg_audio import keys
from ecg_audio.settings import Settings, get_settings

log = structlog.get_logger(__name__)

# how long an instance's roles are kept without a change: a process killed while holding work
# leaves its role behind; the next start of that role clears it (reset), this bounds the rest
PROTECTION_TTL_S = 24 * 3600


class InstanceProtection:
    """Scale-in protection of one instance, following how many tasks it holds.

    AWS is only called when protection must change, so calling ``task_started`` and
    ``task_finished`` around every task costs nothing between transitions. A failed
    call is logged and not fatal; the next transition tries again.
    """

    def __init__(
        self, autoscaling: Any, asg_name: str, instance_id: str, *, shared: Any = None, role: str = "celery"
    ) -> None:
        """``shared``: a Redis client where the instance's roles holding work are kept (see the
        module docstring); None = this process alone decides. ``role``: this process's name there."""
        self._autoscaling = autoscaling
        self.asg_name = asg_name
        self.instance_id = instance_id
        self._shared = shared
        self.role = role
        self._in_flight = 0
        self._protected: bool | None = None  # as last set successfully; None = unknown
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def protected(self) -> bool | None:
        return self._protected

    def task_started(self) -> None:
        with self._lock:
            self._in_flight += 1
            if self._in_flight == 1 or self._shared is None:
                self._holding(True)

    def task_finished(self) -> None:
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            if self._in_flight == 0:
                self._holding(False)

    def reset(self) -> None:
        """No task held: clear protection whatever state AWS is in (e.g. after a crash), unless
        another role of the instance holds work."""
        with self._lock:
            self._in_flight = 0
            self._protected = None
            self._holding(False, force=True)

    def _holding(self, holding: bool, force: bool = False) -> None:
        if self._shared is None:
            self._apply(holding)
            return
        import redis

        key = keys.PROTECTION + self.instance_id
        try:
            with self._shared.lock(key + ":lock", timeout=30, blocking_timeout=10):
                if holding:
                    self._shared.sadd(key, self.role)
                else:
                    self._shared.srem(key, self.role)
                self._shared.expire(key, PROTECTION_TTL_S)
                wanted = bool(self._shared.scard(key))
                state = self._shared.get(key + ":state")
                known = None if force or state is None else state == b"1"
                self._protected = known
                self._apply(wanted)
                if self._protected is wanted:
                    self._shared.set(key + ":state", b"1" if wanted else b"0", ex=PROTECTION_TTL_S)
        except redis.RedisError as e:  # LockError included: the lock not had in time
            # Redis away: decide alone, as a lone worker would (the AWS call is made whatever
            # this process last set, since another role may have changed it since)
            log.warning("scale_in_protection_shared_unavailable", role=self.role, error=type(e).__name__)
            self._protected = None
            self._apply(holding)

    def _apply(self, protected: bool) -> None:
        if self._protected is protected:
            return
        try:
            self._autoscaling.set_instance_protection(
                AutoScalingGroupName=self.asg_name,
                InstanceIds=[self.instance_id],
                ProtectedFromScaleIn=protected,
            )
        except Exception as e:  # any failure (AWS, network, a bad reply): log it, never fail the task
            log.warning(
                "scale_in_protection_failed",
                instance_id=self.instance_id,
                asg=self.asg_name,
                protected=protected,
                error=str(e),
                error_type=type(e).__name__,
            )
            return
        self._protected = protected
        log.info("scale_in_protection", instance_id=self.instance_id, asg=self.asg_name, protected=protected)


_protection: InstanceProtection | None = None
_resolved = False
_resolve_lock = threading.Lock()


def instance_protection_from_settings(
    settings: Settings | None = None, role: str = "celery"
) -> InstanceProtection | None:
    """This process's :class:`InstanceProtection`, or None when it does not apply.

    None when ``ECG_SCALE_IN_PROTECTION`` is false, ``ECG_WORKER_ASG_NAME`` is unset
    or the instance id is unknown (not on EC2 and no ``ECG_INSTANCE_ID``). Resolved
    once per process. ``role``: which of the instance's processes this is ("celery", "stream").
    """
    global _protection, _resolved
    with _resolve_lock:
        if _resolved:
            return _protection
        _resolved = True
        settings = settings or get_settings()
        if not settings.scale_in_protection:
            return None
        if not settings.worker_asg_name:
            log.warning("scale_in_protection_disabled", reason="ECG_WORKER_ASG_NAME is not set")
            return None
        from ops import aws

        instance_id = aws.instance_id(settings)
        if not instance_id:
            log.warning("scale_in_protection_disabled", reason="no instance id (ECG_INSTANCE_ID or IMDSv2)")
            return None
        import redis

        autoscaling = aws.client("autoscaling", settings)
        shared = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        _protection = InstanceProtection(autoscaling, settings.worker_asg_name, instance_id, shared=shared, role=role)
        return _protection


def _forget_protection() -> None:
    """Drop the per-process instance (tests, or a forked child that must rebuild clients)."""
    global _protection, _resolved
    with _resolve_lock:
        _protection, _resolved = None, False


# -- Celery signal receivers: Celery passes keyword arguments only ----------------------


def on_worker_process_init(**_: Any) -> None:
    # boto3 clients must not cross a fork: build this child's own, and clear any
    # protection a killed predecessor left behind (concurrency 1: no other child holds a task).
    _forget_protection()
    protection = instance_protection_from_settings()
    if protection is not None:
        protection.reset()


def on_task_prerun(**_: Any) -> None:
    protection = instance_protection_from_settings()
    if protection is not None:
        protection.task_started()


def on_task_postrun(**_: Any) -> None:
    protection = instance_protection_from_settings()
    if protection is not None:
        protection.task_finished()


def connect_celery_signals() -> None:
    """Connect the receivers above; call once where the worker app is built."""
    from celery import signals

    signals.worker_process_init.connect(on_worker_process_init, weak=False)
    signals.task_prerun.connect(on_task_prerun, weak=False)
    signals.task_postrun.connect(on_task_postrun, weak=False)
