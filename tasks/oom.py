"""What a model stage does when CUDA runs out of memory: a smaller batch, then the CPU, each step noted."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from media_io.workspace import Workspace
from pipeline.errors import GPUMemoryError, is_cuda_oom
from tasks.faults import maybe_inject_oom
from tasks.stage_env import StageEnv

log = structlog.get_logger("ecg.stages")


def oom_fallback(
    stage: str, what: str, job_id: str, env: StageEnv, ws: Workspace, attempt: Callable[[int, str], Any], batch: int
) -> tuple[Any, list[str]]:
    """``attempt(batch, device)`` with the treatment transcribe gives a CUDA out-of-memory error:
    half the batch, then the CPU, each step noted for ``metadata.notes``; out of memory at batch 1
    on the CPU is GPU_MEMORY_ERROR."""
    device = env.models.device
    notes: list[str] = []
    while True:
        try:
            maybe_inject_oom(env.fault_injection, stage, ws)
            return attempt(batch, device), notes
        except Exception as e:
            if not is_cuda_oom(e):
                raise
            if batch > 1:
                notes.append(f"{what}: out of GPU memory at batch size {batch}; retried with {batch // 2}")
                batch //= 2
            elif device != "cpu":
                notes.append(f"{what}: out of GPU memory at batch size 1; fell back to CPU")
                device = "cpu"
            else:
                raise GPUMemoryError(f"{what}: out of memory even at batch size 1 on CPU") from e
            log.warning("cuda_oom_recovered", job_id=job_id, stage=stage, batch_size=batch, device=device)
