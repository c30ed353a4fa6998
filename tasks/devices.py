"""Moving a shared model for one attempt: the models are loaded once per process and serve every job
after, so whatever an attempt changes (device, batch size) is put back when it ends."""

from __future__ import annotations

from typing import Any

from pipeline.audio import release_freed_memory


class on_device:
    """Run a torch model on ``device`` for one attempt, then put it back (it is shared by later jobs)."""

    def __init__(self, model: Any, device: str, home: str) -> None:
        self.model, self.device, self.home = model, device, home
        self.moved = device != home and hasattr(model, "to")

    def __enter__(self) -> None:
        if self.moved:
            self.model.to(self.device)

    def __exit__(self, *exc: object) -> None:
        if self.moved:
            self.model.to(self.home)
            release_freed_memory()


class diarization_settings(on_device):
    """Diarization at a smaller batch (segmentation and embedding) and/or on the CPU, restored after."""

    def __init__(self, pipeline: Any, batch: int, device: str, home: str) -> None:
        super().__init__(pipeline, device, home)
        self.batch = batch
        self.saved = {
            k: getattr(pipeline, k) for k in ("embedding_batch_size", "segmentation_batch_size") if hasattr(pipeline, k)
        }

    def __enter__(self) -> None:
        for k, v in self.saved.items():
            if v and v > self.batch:
                setattr(self.model, k, self.batch)
        if self.moved:
            import torch

            self.model.to(torch.device(self.device))

    def __exit__(self, *exc: object) -> None:
        for k, v in self.saved.items():
            setattr(self.model, k, v)
        if self.moved:
            import torch

            self.model.to(torch.device(self.home))
            release_freed_memory()
