"""Where ``s3://`` inputs may point: the configured input locations, never the workspace.

A worker's role can read the workspace bucket, other jobs' ``temp/{job_id}/audio.wav``
included; a job naming such an object would read another job's data. The shim (at
submission) and the worker (at fetch) build their URL policy with this scope, so such a
URL is refused before any S3 call, with the same message as any other location outside
``ECG_S3_INPUT_PREFIXES``.
"""

from __future__ import annotations

from typing import Any

WORKSPACE_PREFIXES = ("temp/", "output/", "uploads/")


def s3_input_scope(settings: Any) -> dict[str, Any]:
    """``UrlPolicy`` fields: ``s3_inputs`` from ``ECG_S3_INPUT_PREFIXES`` (none configured: no s3:// input)
    and ``s3_denied``, the workspace bucket's prefixes."""
    bucket = getattr(settings, "s3_bucket", None)
    denied = tuple(f"{bucket}/{p}" for p in WORKSPACE_PREFIXES) if bucket else ()
    return {"s3_inputs": tuple(getattr(settings, "s3_input_prefixes", ()) or ()), "s3_denied": denied}
