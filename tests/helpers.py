"""Helpers shared by the tests: the one way to wait for a condition, and Settings for moto.

Tests that wait for a process, a thread or a timer poll a condition with a generous deadline
(``wait_for``); they never sleep a fixed time and then look. The machines that run them may be
loaded several times over, so a deadline is a bound on a hang, not a measurement.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

from ecg_audio.settings import Settings

T = TypeVar("T")

REGION = "us-east-1"


def wait_for(
    condition: Callable[[], T],
    timeout: float = 60.0,
    *,
    interval: float = 0.05,
    what: str | Callable[[], str] = "",
) -> T:
    """Poll ``condition`` every ``interval`` seconds until it returns something truthy; return that.

    After ``timeout`` seconds (checked once more at the deadline) raise ``TimeoutError`` naming
    ``what`` (a callable is called then, e.g. to show a process's log tail).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = what() if callable(what) else what
            raise TimeoutError(f"not met after {timeout:g} s: {detail or getattr(condition, '__name__', 'condition')}")
        time.sleep(interval)


def wait_for_renewals(client: Any, key: str, count: int, timeout: float = 60.0) -> None:
    """Wait until the TTL of Redis ``key`` has been renewed ``count`` times (its PTTL went up) by
    its holder: the value (a lock's token) must stay what it was, or this fails at once.

    A lease renewed every ttl/3 has outlived its own TTL after 4 renewals: a test proves "held
    past its TTL" by counting renewals, not by sleeping past the TTL and hoping the renewer ran.
    """
    holder = client.get(key)
    assert holder is not None, f"{key} is not held"
    state = {"seen": 0, "last": client.pttl(key)}

    def renewed_enough() -> bool:
        now = client.pttl(key)
        value = client.get(key)
        assert value == holder, f"{key} lapsed or changed hands: {holder!r} -> {value!r}"
        if now > state["last"]:
            state["seen"] += 1
        state["last"] = now
        return state["seen"] >= count

    wait_for(renewed_enough, timeout, interval=0.02, what=lambda: f"{count} renewals of {key}, saw {state['seen']}")


def make_settings(**overrides: Any) -> Settings:
    """``Settings`` from the environment plus ``overrides``.

    Through ``**overrides`` because mypy, without the pydantic plugin, takes the
    fields declared as ``Field(<default>, ...)`` for required arguments.
    """
    return Settings(**overrides)


def reset_moto(endpoint: str) -> None:
    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).close()


def aws_settings(endpoint: str) -> Settings:
    return make_settings(
        aws_region=REGION,
        aws_endpoint_url=endpoint,
        worker_asg_name="ecg-workers-test",
        metrics_namespace="ECG/AudioAnalysis",
        secrets_manager_secret_id=None,
        instance_id=None,
    )


class Forked:
    """A function run in a forked child, as a Celery prefork pool child runs a task.

    ``os.fork`` rather than ``multiprocessing``: a multiprocessing child first runs the after-fork
    hooks registered in the parent, and kombu's closes every connection pool an earlier test left
    in this process, reading from sockets the parent still owns (a BRPOP in progress never
    answers the child: it hung there, in the clean-clone runs). The child runs ``target`` and exits
    with 0 whatever it raised; ``exitcode`` is negative for a signal, as multiprocessing has it.
    """

    def __init__(self, target: Callable[..., Any], *args: Any) -> None:
        self.target, self.args = target, args
        self.pid: int | None = None
        self.exitcode: int | None = None

    def start(self) -> Forked:
        import os

        pid = os.fork()
        if pid == 0:  # the child
            try:
                self.target(*self.args)
            except BaseException:  # noqa: S110  (the test reads what the child did from Redis)
                pass
            finally:
                os._exit(0)
        self.pid = pid
        return self

    def poll(self) -> int | None:
        import os

        if self.exitcode is None and self.pid is not None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exitcode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return self.exitcode

    def join(self, timeout: float) -> int | None:
        """The exit code, or None if the child still runs after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.exitcode
