"""The model registry: every model is built once per process and stays loaded.

A worker process calls ``preload()`` from ``worker_process_init``; every job
after that asks the registry and gets the same objects back. ``loads`` counts
how many times each model was actually built in this process, which is how a
test proves that a second job on a warm worker loads nothing.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from typing import Any

import structlog

from ecg_audio.settings import EMBEDDED, Settings, offline_model_env
from pipeline.errors import UnsupportedOptionError

log = structlog.get_logger("ecg.models")


class ModelRegistry:
    def __init__(self, settings: Settings) -> None:
        offline_model_env()
        self.settings = settings
        self.device = settings.resolved_device()
        self.loads: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._asr: dict[tuple[str, str], Any] = {}
        self._diarization: Any = None
        self._aligners: dict[str, Any] = {}
        self._configure_threads()

    def _configure_threads(self) -> None:
        import torch

        if self.device == "cpu":
            n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            torch.set_num_threads(max(1, n))

    def compute_type(self, device: str) -> str:
        ct = self.settings.compute_type
        if ct != "auto":
            return ct
        return "float16" if device == "cuda" else "int8"

    # --- ASR -------------------------------------------------------------
    def asr_name_for(self, language: str | None) -> str:
        """Which configured ASR model serves ``language``."""
        if language and language.lower() not in {"en", "english"}:
            if self.settings.asr_multilingual_model:
                return self.settings.asr_multilingual_model
            if self._is_english_only_name(self.settings.asr_model):
                raise UnsupportedOptionError(
                    f"language {language!r} needs a multilingual ASR model, but the configured model "
                    f"({self.settings.asr_model!r}, tiny.en when 'embedded') is English-only; set "
                    "ECG_ASR_MULTILINGUAL_MODEL (e.g. large-v3) on the workers"
                )
        return self.settings.asr_model

    @staticmethod
    def _is_english_only_name(name: str) -> bool:
        return name == EMBEDDED or name.rstrip("/").endswith(".en")

    def asr(self, language: str | None = None, *, device: str | None = None) -> tuple[Any, str]:
        from pipeline.transcribe import check_language, load_asr_model

        name = self.asr_name_for(language)
        device = device or self.device
        key = (name, device)
        with self._lock:
            if key not in self._asr:
                log.info("model_loading", model="asr", name=name, device=device)
                self._asr[key] = load_asr_model(
                    name,
                    device=device,
                    compute_type=self.compute_type(device),
                    beam_size=self.settings.asr_beam_size,
                )
                self.loads[f"asr:{name}:{device}"] += 1
            model = self._asr[key]
        check_language(model, language, name)
        return model, ("tiny.en (embedded)" if name == EMBEDDED else name)

    # --- diarization -----------------------------------------------------
    def diarization(self) -> tuple[Any, str]:
        from pipeline.diarize import load_diarization_pipeline

        name = self.settings.diarization_model
        with self._lock:
            if self._diarization is None:
                log.info("model_loading", model="diarization", name=name, device=self.device)
                token = self.settings.hf_token.get_secret_value() if self.settings.hf_token else None
                self._diarization = load_diarization_pipeline(
                    name,
                    device=self.device,
                    hf_token=token,
                    batch_size=self.settings.diarization_batch_size,
                    runtime=self.settings.diarization_runtime,
                    onnx_cache_dir=self.settings.onnx_cache_dir,
                )
                self.loads[f"diarization:{name}"] += 1
        label = "pyannote segmentation-3.0 + CAM++ (embedded)" if name == EMBEDDED else name
        return self._diarization, label

    # --- alignment -------------------------------------------------------
    def aligner(self, language: str) -> tuple[Any, str] | None:
        """A wav2vec2 aligner when one is configured, else None (Whisper's own timestamps are used)."""
        name = self.settings.alignment_model
        if not name:
            return None
        from pipeline.align import load_wav2vec2_aligner

        with self._lock:
            if language not in self._aligners:
                self._aligners[language] = load_wav2vec2_aligner(name, language, self.device)
                self.loads[f"align:{name}:{language}"] += 1
        return self._aligners[language], name

    def preload(self) -> None:
        """Build the default models now, so the first job pays nothing."""
        self.asr(None)
        self.diarization()

    def stats(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "device": self.device, "loads": dict(self.loads)}


_registry: ModelRegistry | None = None
_registry_lock = threading.Lock()


def get_registry(settings: Settings | None = None) -> ModelRegistry:
    """The process-wide registry (built on first use)."""
    global _registry
    with _registry_lock:
        if _registry is None:
            from ecg_audio.settings import get_settings

            _registry = ModelRegistry(settings or get_settings())
        return _registry
