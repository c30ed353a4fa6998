"""Per-job workspace: where stage artifacts live between stages.

Every artifact is written atomically (temporary name, then rename), so a stage
that dies half-way leaves no half-written artifact: a redelivered job sees
either the whole artifact or none, and resumes at the first missing one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_job_id(job_id: str) -> str:
    """A job id names directories and keys: letters, digits, '.', '_', '-', at most 128, no '..'."""
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id) or ".." in job_id:
        raise ValueError(
            "job_id must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "start with a letter or digit, and not contain '..'"
        )
    return job_id


@dataclass(frozen=True)
class Workspace:
    """A local directory holding one job's artifacts."""

    root: Path
    job_id: str

    @classmethod
    def open(cls, base: Path | str, job_id: str) -> Workspace:
        validate_job_id(job_id)
        root = Path(base) / job_id
        root.mkdir(parents=True, exist_ok=True)
        return cls(root=root, job_id=job_id)

    def path(self, name: str) -> Path:
        if "/" in name or name.startswith("."):
            raise ValueError(f"artifact names are plain file names, got {name!r}")
        return self.root / name

    def has(self, name: str) -> bool:
        return self.path(name).exists()

    def write_json(self, name: str, data: Any) -> Path:
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
        return self.write_bytes(name, payload)

    def read_json(self, name: str) -> Any:
        return json.loads(self.path(name).read_bytes())

    def write_bytes(self, name: str, payload: bytes) -> Path:
        target = self.path(name)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix="-" + name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def commit_file(self, name: str, produced: Path) -> Path:
        """Move a file produced elsewhere in the workspace into place atomically."""
        target = self.path(name)
        os.replace(produced, target)
        return target

    def tmp_path(self, suffix: str = "") -> Path:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=suffix)
        os.close(fd)
        return Path(tmp)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def sweep_stale(base: Path | str, older_than_s: float, *, now: float | None = None) -> list[str]:
    """Remove workspaces untouched for longer than ``older_than_s``; returns the job ids removed."""
    base = Path(base)
    now = time.time() if now is None else now
    removed: list[str] = []
    if not base.is_dir():
        return removed
    for child in base.iterdir():
        if not child.is_dir():
            continue
        newest = max((p.stat().st_mtime for p in child.rglob("*")), default=child.stat().st_mtime)
        if now - newest > older_than_s:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return removed
