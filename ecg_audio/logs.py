"""Structured logs: one JSON object per line, with job_id and stage bound by the tasks."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def _real_stderr():  # type: ignore[no-untyped-def]
    """The process's stderr even inside a Celery pool child, where sys.stderr is Celery's proxy
    (writing to it from a log handler would loop back into logging and be dropped)."""
    return sys.__stderr__ or sys.stderr


def configure_logging(level: str = "INFO", json_output: bool = True) -> None:
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=_real_stderr()),
        cache_logger_on_first_use=False,
    )
    # libraries that log through the standard library go through the same renderer
    handler = logging.StreamHandler(_real_stderr())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer], foreign_pre_chain=shared
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "botocore", "urllib3", "speechbrain", "whisperx", "faster_whisper"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "Lightning automatically upgraded your loaded checkpoint ..." on every model load
    for chatty in ("lightning", "lightning.pytorch", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(chatty).setLevel(logging.ERROR)


def quiet_model_warnings() -> None:
    """Silence warnings that say nothing actionable in this deployment (pyannote's torchcodec warning
    is silenced where pyannote is imported, ``pipeline.diarize``)."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"pyannote\..*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torchaudio\..*")
    warnings.filterwarnings("ignore", message=r".*upgrade_checkpoint.*")
    # "Lightning automatically upgraded your loaded checkpoint ..." on every model load; lightning resets
    # its top logger's level at import, so the specific child logger is silenced instead
    for name in (
        "lightning.pytorch.utilities.migration.utils",
        "lightning_fabric.utilities.migration",
        "pytorch_lightning.utilities.migration.utils",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
