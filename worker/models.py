"""The model registry: every model is built once per process and stays loaded.

A worker process calls ``preload()`` from ``worker_process_init``; every job
after that asks the registry and gets the same objects back. ``loads`` counts
how many times each model was actually built in this process, which is how a
test proves that a second job on a warm worker loads nothing.
"""

from __future__ import annotations

import os
import threading
from collections import Counter, OrderedDict
from typing import Any

import structlog

from ecg_audio.settings import EMBEDDED, Settings, offline_model_env

log = structlog.get_logger("ecg.models")


class ModelRegistry:
    def __init__(self, settings: Settings) -> None:
        offline_model_env()
        self.settings = settings
        self.device = settings.resolved_device()
        self.loads: Counter[str] = Counter()
        self._lock = threading.RLock()
        self.unloads: Counter[str] = Counter()
        self._asr: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._diarization: Any = None
        self._aligners: dict[str, Any] = {}
        self._configure_threads()

    def _configure_threads(self) -> None:
        """Every model library's thread count from one setting, before any model is built (the
        ONNX Runtime sessions copy torch's count when they are created)."""
        from worker.cpu import configure_torch_threads, cpu_threads

        self.cpu_threads = cpu_threads(self.settings.cpu_threads)
        if self.device == "cpu":
            configure_torch_threads(self.cpu_threads)

    def compute_type(self, device: str) -> str:
        ct = self.settings.compute_type
        if ct != "auto":
            return ct
        from worker.cpu import auto_compute_type

        return auto_compute_type(device)

    # --- ASR -------------------------------------------------------------
    def asr_route(
        self, language: str | None = None, *, model: str | None = None, device: str | None = None
    ) -> tuple[Any, str]:
        """The ASR models a job uses (a ``pipeline.transcribe.AsrRoute``) and a label for them.

        ``model`` (options.model, checked against the allowlist) decodes everything alone, as
        does a multilingual ``asr_model`` (large-v3-turbo in a GPU image). With an English-only
        ``asr_model`` (tiny.en by default) English goes to it, the fast path, and every other
        language, and the identification of an unknown one, to ``asr_multilingual_model``.
        """
        from ecg_audio.languages import check_job, is_english_only
        from pipeline.transcribe import AsrRoute

        choice = check_job(language, model, self.settings)
        language, model = choice.language, choice.model
        device = device or self.device
        main_name = self.settings.asr_model
        multi = self.settings.asr_multilingual_model
        if model:
            return AsrRoute(self._asr_model(model, device), self.asr_label(model)), self.asr_label(model)
        if language == "en" or not multi or not is_english_only(main_name):
            return AsrRoute(self._asr_model(main_name, device), self.asr_label(main_name)), self.asr_label(main_name)
        route = AsrRoute(self._asr_model(multi, device), self.asr_label(multi))
        if language is None and main_name != multi:
            route.english, route.english_name = self._asr_model(main_name, device), self.asr_label(main_name)
        return route, route.main_name

    def asr(self, language: str | None = None, *, device: str | None = None) -> tuple[Any, str]:
        """The one model that decodes ``language`` (None: the one that identifies languages)."""
        route, _ = self.asr_route(language, device=device)
        return route.for_language(language) if language else (route.main, route.main_name)

    @staticmethod
    def asr_label(name: str) -> str:
        from pipeline.asr_models import EMBEDDED_MULTILINGUAL

        return {EMBEDDED: "tiny.en (embedded)", EMBEDDED_MULTILINGUAL: "whisper-base (embedded)"}.get(name, name)

    def _asr_model(self, name: str, device: str) -> Any:
        """Load (once) and return an ASR model; beyond ``asr_max_resident`` the least recently
        used other one is unloaded."""
        from pipeline.audio import release_freed_memory
        from pipeline.transcribe import load_asr_model

        key = (name, device)
        with self._lock:
            if key in self._asr:
                self._asr.move_to_end(key)
                return self._asr[key]
            log.info("model_loading", model="asr", name=name, device=device)
            model = load_asr_model(
                name,
                device=device,
                compute_type=self.compute_type(device),
                beam_size=self.settings.asr_beam_size,
                threads=self.cpu_threads,
                cache_dir=self.settings.model_cache_dir,
            )
            self.loads[f"asr:{name}:{device}"] += 1
            self._asr[key] = model
            while len(self._asr) > self.settings.asr_max_resident:
                old, _ = self._asr.popitem(last=False)
                self.unloads[f"asr:{old[0]}:{old[1]}"] += 1
                log.info("model_unloaded", model="asr", name=old[0], device=old[1], reason="least recently used")
            release_freed_memory()
            return model

    def resident_asr(self) -> list[str]:
        """Names of the ASR models loaded now, least recently used first."""
        with self._lock:
            return [name for name, _ in self._asr]

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
        """The wav2vec2 aligner configured for ``language`` (ECG_ALIGNMENT_MODELS, else
        ECG_ALIGNMENT_MODEL), or None: Whisper's own word times are used."""
        from ecg_audio.languages import aligner_name

        name = aligner_name(language, self.settings)
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
        self.asr("en")  # asr_model: the English fast path (or every language, when multilingual)
        self.asr(None)  # the model that identifies languages (asr_multilingual_model beside tiny.en)
        self.diarization()

    def stats(self) -> dict[str, Any]:
        from worker.cpu import thread_report

        with self._lock:
            asr = {f"{name}:{device}": _asr_settings(model) for (name, device), model in self._asr.items()}
        return {
            "pid": os.getpid(),
            "device": self.device,
            "loads": dict(self.loads),
            "unloads": dict(self.unloads),
            "asr_resident": self.resident_asr(),
            "cpu_threads": self.cpu_threads,
            "compute_type": self.compute_type(self.device),
            "asr": asr,
            "threads": thread_report(),
        }


def _asr_settings(model: Any) -> dict[str, Any]:
    """What CTranslate2 resolved for a loaded model: the compute type it runs (``int8`` resolves
    to ``int8_float32`` on a CPU for a model saved in float16) and its threads."""
    ct2 = getattr(getattr(model, "model", None), "model", None)
    return {
        "compute_type": getattr(ct2, "compute_type", None),
        "cpu_threads": getattr(model, "ecg_cpu_threads", None),
        "num_workers": getattr(ct2, "num_workers", None),
    }


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
