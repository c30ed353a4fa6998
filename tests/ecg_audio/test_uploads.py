"""Uploads are found by the worker wherever the shim put them, and do not stay forever."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ecg_audio.uploads import SweepThrottle, s3_key, sweep_uploads, upload_id
from media_io.urlguard import UrlPolicy
from pipeline.errors import InvalidMediaError
from tasks.stage_env import StageEnv
from tasks.storage import upload_source


def _aged(path: Path, age_s: float) -> Path:
    path.write_bytes(b"x")
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_sweep_deletes_only_old_files(tmp_path: Path) -> None:
    old = _aged(tmp_path / ("a" * 32), 3 * 86400)
    abandoned = _aged(tmp_path / f".{'b' * 32}.part", 3 * 86400)
    fresh = _aged(tmp_path / ("c" * 32), 60)
    (tmp_path / "subdir").mkdir()
    assert sweep_uploads(tmp_path, 2 * 86400) == 2
    assert not old.exists() and not abandoned.exists() and fresh.exists() and (tmp_path / "subdir").is_dir()
    assert sweep_uploads(tmp_path / "absent", 1) == 0


def test_sweep_throttle_runs_once_per_interval() -> None:
    throttle = SweepThrottle(every_s=600)
    assert throttle.due(now=1000.0)
    assert not throttle.due(now=1599.0)
    assert throttle.due(now=1600.5)


def test_upload_ids_are_32_hex_digits() -> None:
    assert upload_id("upload://" + "0f" * 16) == "0f" * 16
    assert s3_key("0f" * 16) == "uploads/" + "0f" * 16
    for bad in ("upload://../../etc/passwd", "upload://" + "A" * 32, "upload://abc", "https://x/upload://" + "0" * 32):
        assert upload_id(bad) is None


def _env(tmp_path: Path) -> StageEnv:
    return StageEnv(
        workspace_root=tmp_path / "ws", output_root=tmp_path / "out", models=None, report=None,  # type: ignore[arg-type]
        uploads_dir=tmp_path / "uploads",
    )


def test_a_local_upload_is_read_from_the_uploads_directory(tmp_path: Path) -> None:
    env = _env(tmp_path)
    env.uploads_dir.mkdir()  # type: ignore[union-attr]
    uid = "1" * 32
    (env.uploads_dir / uid).write_bytes(b"media")  # type: ignore[operator]
    source, policy = upload_source(f"upload://{uid}", env, UrlPolicy())
    assert source == str(tmp_path / "uploads" / uid) and policy.allow_local_files


def test_a_missing_or_malformed_upload_says_so(tmp_path: Path) -> None:
    env = _env(tmp_path)
    with pytest.raises(InvalidMediaError, match="the uploaded file is gone"):
        upload_source("upload://" + "2" * 32, env, UrlPolicy())
    with pytest.raises(InvalidMediaError, match="malformed upload id"):
        upload_source("upload://../x", env, UrlPolicy())


def test_the_shim_sweeps_expired_uploads_at_most_once_per_interval(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from api_shim.app import create_app
    from ecg_audio.settings import Settings

    settings = Settings(
        workspace_root=tmp_path / "workspaces", output_root=tmp_path / "output", api_keys=["k"], upload_ttl_s=3600
    )
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    expired = _aged(uploads / ("e" * 32), 2 * 3600)
    client = TestClient(create_app(settings), headers={"Authorization": "Bearer k"})  # no lifespan: no Redis
    first = client.post("/api/uploads", content=b"media bytes")
    assert first.status_code == 201, first.text
    uid = first.json()["video_url"].removeprefix("upload://")
    assert (uploads / uid).read_bytes() == b"media bytes"
    assert not expired.exists()
    later = _aged(uploads / ("f" * 32), 2 * 3600)
    assert client.post("/api/uploads", content=b"more").status_code == 201
    assert later.exists()  # swept again only after SWEEP_EVERY_S
