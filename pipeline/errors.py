"""Domain errors: one code per outcome the API reports.

Retry policy lives here, in one place: bad input is never retried, network
faults are, and a CUDA out-of-memory error is handled by the caller (smaller
batch, then CPU) before it ever becomes a job failure.
"""

from __future__ import annotations


class AnalysisError(Exception):
    """Base error. ``code`` is what the API reports; ``message`` is for a person. Each subclass is
    the one definition of its code (``ecg_audio.messages`` explains each code to a person)."""

    code = "PROCESSING_ERROR"
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool | None = None,
        key: str | None = None,
        values: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        # a message the catalog has in other languages (ecg_audio.messages.ERROR_DETAILS): its key
        # and the values it names; ``message`` is its English text
        self.key = key
        self.values = dict(values or {})
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable

    def to_dict(self) -> dict[str, str]:
        return {"error_code": self.code, "error_message": self.message}


class DownloadError(AnalysisError):
    """The input could not be fetched. Network faults are retryable; 4xx answers are not."""

    code = "DOWNLOAD_ERROR"
    retryable = True


class InvalidMediaError(AnalysisError):
    """The input is not media we can read: never retried."""

    code = "INVALID_MEDIA"


class UnsupportedOptionError(AnalysisError):
    """The job asks for something this deployment is not configured for (e.g. a language)."""

    code = "UNSUPPORTED_OPTION"


class ProcessingError(AnalysisError):
    """A failure inside the analysis: the base's code, PROCESSING_ERROR."""


class GPUMemoryError(AnalysisError):
    code = "GPU_MEMORY_ERROR"


class StageTimeoutError(AnalysisError):
    code = "TIMEOUT_ERROR"


class CancelledError(AnalysisError):
    code = "CANCELLED"


class StageCrashedError(AnalysisError):
    """A stage's message was delivered more times than the poison-message limit allows: each run
    killed its worker (or the worker died under it), so the job fails instead of taking down more."""

    code = "STAGE_CRASHED"


class StreamWorkerLostError(AnalysisError):
    """The stream worker serving a live stream stopped answering (its heartbeat lapsed): the client
    may reconnect and start a new stream, which another worker takes."""

    code = "STREAM_WORKER_LOST"
    retryable = True


class NoStreamSlotError(AnalysisError):
    """Every stream worker's slots are taken (or none runs): retry after a few seconds."""

    code = "NO_STREAM_SLOT"
    retryable = True


def is_cuda_oom(exc: BaseException) -> bool:
    """True for torch's and CTranslate2's out-of-memory errors (and our injected one)."""
    name = type(exc).__name__
    text = str(exc).lower()
    return name == "OutOfMemoryError" or "out of memory" in text or "cuda_error_out_of_memory" in text
