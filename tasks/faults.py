"""Fault injection for the tests and the chaos bench (``ECG_FAULT_INJECTION``, comma-separated rules).

- ``crash:<point>:<n>[:<job id prefix>]`` kills this process the first n times a job reaches ``point``
  (a stage name, or ``before_final``: the result stored, the job not yet reported), counted in Redis
  so that it survives the crash it causes;
- ``pause:<point>:<seconds>[:<job id prefix>]`` sleeps there (a window for a DELETE);
- ``cuda_oom:<stage>:<n>`` raises a CUDA out-of-memory error the first n times the stage's model
  work runs for a job (counted in the job's workspace).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import structlog

from ecg_audio import keys
from media_io.workspace import Workspace

log = structlog.get_logger("ecg.tasks")


class InjectedOutOfMemoryError(RuntimeError):
    """Looks like CUDA's OOM to the handling code: ``CUDA out of memory`` in the message."""


def maybe_crash(rules: str | None, point: str, job_id: str, redis_client: Any) -> None:
    """The ``crash`` and ``pause`` rules at ``point`` for ``job_id``."""
    if not rules:
        return
    for rule in rules.split(","):
        parts = rule.strip().split(":")
        if len(parts) not in (3, 4) or parts[1] != point or not job_id.startswith(parts[3] if len(parts) == 4 else ""):
            continue
        if parts[0] == "crash":
            seen = int(redis_client.incr(f"{keys.FAULT}{job_id}:{point}"))
            if seen <= int(parts[2]):
                log.warning("fault_injected_crash", point=point, n=seen)
                os.kill(os.getpid(), signal.SIGKILL)
        elif parts[0] == "pause":
            log.warning("fault_injected_pause", point=point, seconds=float(parts[2]))
            time.sleep(float(parts[2]))


def maybe_inject_oom(rules: str | None, stage: str, ws: Workspace) -> None:
    """The ``cuda_oom`` rules of ``stage``."""
    if not rules:
        return
    for rule in rules.split(","):
        parts = rule.strip().split(":")
        if len(parts) == 3 and parts[0] == "cuda_oom" and parts[1] == stage:
            counter = ws.path(f"fault-{stage}.count")
            seen = int(counter.read_text()) if counter.exists() else 0
            if seen < int(parts[2]):
                counter.write_text(str(seen + 1))
                raise InjectedOutOfMemoryError("CUDA out of memory (injected by ECG_FAULT_INJECTION)")
