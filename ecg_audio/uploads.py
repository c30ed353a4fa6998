"""Where ``POST /api/uploads`` puts a file, and how a worker finds it again.

The shim and the workers must see the same uploads, and they rarely share a disk: in
``docker-compose.yml`` they are separate containers (a shared ``uploads`` volume), and
an autoscaled fleet runs them on separate machines. So:

* local (``ECG_WORKSPACE_BACKEND=local``): ``<var>/uploads/<id>``, which the shim and
  the workers must share (one host, or one volume);
* S3 (``ECG_WORKSPACE_BACKEND=s3``): ``s3://ECG_S3_BUCKET/uploads/<id>``; the shim spools
  the body to its own disk, then uploads it (multipart above 8 MB).

Uploads are not kept forever: a local file older than ``ECG_UPLOAD_TTL_S`` (2 days) is
deleted by the shim (checked at most every 10 minutes, on an upload) and by every worker
at start; on S3 the bucket's lifecycle rule expires ``uploads/`` (``infra/worker-asg.yaml``).

Torch-free: the shim imports it.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ecg_audio.settings import Settings

UPLOAD_PREFIX = "uploads/"
UPLOAD_URL = re.compile(r"upload://([a-f0-9]{32})")
SWEEP_EVERY_S = 600.0


def uploads_dir(settings: Settings) -> Path:
    """The local uploads directory (the S3 backend spools there too)."""
    return settings.workspace_root.parent / "uploads"


def upload_bucket(settings: Settings) -> str | None:
    """The bucket that holds uploads, or None when they are local files."""
    return settings.s3_bucket if settings.workspace_backend == "s3" and settings.s3_bucket else None


def upload_id(url: str) -> str | None:
    """The id of an ``upload://<32 hex>`` URL, or None for anything else."""
    m = UPLOAD_URL.fullmatch(url)
    return m.group(1) if m else None


def s3_key(upload: str) -> str:
    return UPLOAD_PREFIX + upload


def sweep_uploads(directory: Path, older_than_s: float, *, now: float | None = None) -> int:
    """Delete uploads (and abandoned ``.part`` spool files) not modified for ``older_than_s``;
    returns how many were deleted. Files that vanish meanwhile are not errors."""
    now = time.time() if now is None else now
    removed = 0
    if not directory.is_dir():
        return 0
    for path in directory.iterdir():
        try:
            if path.is_file() and now - path.stat().st_mtime > older_than_s:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


class SweepThrottle:
    """Runs a sweep at most once per ``every_s``, whoever asks (thread-safe)."""

    def __init__(self, every_s: float = SWEEP_EVERY_S) -> None:
        self.every_s = every_s
        self._last = float("-inf")
        self._lock = threading.Lock()

    def due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            if now - self._last < self.every_s:
                return False
            self._last = now
            return True


def upload_to_s3(client: Any, bucket: str, upload: str, path: Path) -> None:
    """One object per upload; boto3 switches to multipart above 8 MB."""
    client.upload_file(str(path), bucket, s3_key(upload))
