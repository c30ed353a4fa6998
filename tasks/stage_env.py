"""What a stage body is given besides the job: models, a progress reporter, limits, where files live.

Built from settings by the caller (``tasks.context.stage_env`` for the Celery tasks, the in-process
runner for ``ecg-audio analyze``), so the bodies know neither Celery nor the settings object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from media_io.workspace import S3Workspace, Workspace


class ModelProvider(Protocol):
    device: str

    def asr(self, language: str | None = None, *, device: str | None = None) -> tuple[Any, str]: ...

    def asr_route(
        self, language: str | None = None, *, model: str | None = None, device: str | None = None
    ) -> tuple[Any, str]: ...

    def diarization(self) -> tuple[Any, str]: ...

    def aligner(self, language: str) -> tuple[Any, str] | None: ...


class Reporter(Protocol):
    """Takes a message a person reads; the stage bodies report keys, which ``run_stage`` renders."""

    def __call__(self, stage: str, progress: int, message: str) -> None: ...


@dataclass
class StageEnv:
    """Everything a stage needs besides the job: built from settings by the caller."""

    workspace_root: Path
    output_root: Path
    models: ModelProvider
    report: Reporter
    batch_size: int | None = None  # ASR batch; None: 8 on CUDA, 4 on CPU (see asr_batch_size)
    max_download_bytes: int = 4 * 1024**3
    max_duration_s: float = 4 * 3600.0
    network_timeout_s: float = 30.0
    url_policy: Any = None  # media_io.urlguard.UrlPolicy
    s3_client_factory: Callable[[], Any] | None = None
    fault_injection: str | None = None
    keep_workspace: bool = False
    uploads_dir: Path | None = None  # where upload://<id> inputs live
    s3_bucket: str | None = None  # set: workspace under s3://bucket/temp/{job}/, results under output/
    speakers: Any = None  # pipeline.voiceprints.SpeakerAccess: enrolled voices, for speakers by name (merge)
    _s3: Any = None

    def asr_batch_size(self, device: str) -> int:
        """4 on CPU: no slower than 8 there (the CPU is busy either way) with half the encoder's
        attention memory; 8 on a GPU, where a larger batch keeps it busy."""
        return self.batch_size or (4 if device == "cpu" else 8)

    def s3(self) -> Any:
        if self._s3 is None:
            if self.s3_client_factory is None:
                raise RuntimeError("an S3 workspace needs an S3 client factory")
            self._s3 = self.s3_client_factory()
        return self._s3

    def workspace(self, job_id: str) -> Workspace:
        if self.s3_bucket:
            return S3Workspace.open_s3(self.workspace_root, job_id, self.s3(), self.s3_bucket)
        return Workspace.open(self.workspace_root, job_id)
