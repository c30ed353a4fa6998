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

    def _local(self, name: str) -> Path:
        if "/" in name or name.startswith("."):
            raise ValueError(f"artifact names are plain file names, got {name!r}")
        return self.root / name

    def path(self, name: str) -> Path:
        """Where to read an artifact on this machine."""
        return self._local(name)

    def has(self, name: str) -> bool:
        return self._local(name).exists()

    def write_json(self, name: str, data: Any) -> Path:
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
        return self.write_bytes(name, payload)

    def read_json(self, name: str) -> Any:
        return json.loads(self.path(name).read_bytes())

    def write_bytes(self, name: str, payload: bytes) -> Path:
        target = self._local(name)
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
        target = self._local(name)
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


MULTIPART_THRESHOLD = 64 * 1024 * 1024


class S3Workspace(Workspace):
    """A workspace whose artifacts live under ``s3://bucket/temp/{job_id}/``.

    Chained stages may run on different machines: each reads what it needs from
    S3 (cached in a local directory) and uploads what it writes. An upload is one
    PUT (multipart above 64 MB), so an artifact in S3 is always whole: the
    checkpoint rule holds across machines.
    """

    _client: Any
    _bucket: str
    _prefix: str

    def __init__(self, root: Path, job_id: str, client: Any, bucket: str, prefix: str = "temp") -> None:
        object.__setattr__(self, "root", root)
        object.__setattr__(self, "job_id", job_id)
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "_bucket", bucket)
        object.__setattr__(self, "_prefix", f"{prefix}/{job_id}/")

    @classmethod
    def open_s3(cls, cache: Path | str, job_id: str, client: Any, bucket: str) -> S3Workspace:
        validate_job_id(job_id)
        root = Path(cache) / job_id
        root.mkdir(parents=True, exist_ok=True)
        return cls(root, job_id, client, bucket)

    def key(self, name: str) -> str:
        return self._prefix + name

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)

    def has(self, name: str) -> bool:
        if self._local(name).exists():
            return True
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self._bucket, Key=self.key(name))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def path(self, name: str) -> Path:
        """A local path; the artifact is fetched from S3 first when this machine lacks it."""
        local = self._local(name)
        if not local.exists() and self.has(name):
            tmp = self.tmp_path("-" + name)
            self._client.download_file(self._bucket, self.key(name), str(tmp), Config=self._transfer_config())
            os.replace(tmp, local)
        return local

    def _upload(self, name: str) -> None:
        self._client.upload_file(str(self._local(name)), self._bucket, self.key(name), Config=self._transfer_config())

    def write_bytes(self, name: str, payload: bytes) -> Path:
        target = super().write_bytes(name, payload)
        self._upload(name)
        return target

    def commit_file(self, name: str, produced: Path) -> Path:
        target = super().commit_file(name, produced)
        self._upload(name)
        return target

    def remove(self) -> None:
        super().remove()
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self._bucket, Prefix=self._prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self._client.delete_objects(Bucket=self._bucket, Delete={"Objects": keys})
