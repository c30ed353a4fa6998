"""Presigned uploads (api_shim/presign.py): the client PUTs to the bucket (moto), the shim never sees the body."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api_shim.app import create_app
from ecg_audio.settings import Settings
from ecg_audio.uploads import s3_key, upload_id
from ops import aws

KEY = "presign-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _app(settings: Settings, tmp_path: Path, **overrides: object) -> TestClient:
    configured = settings.model_copy(
        update={
            "api_keys": [SecretStr(KEY)],
            "workspace_root": tmp_path / "workspaces",
            "output_root": tmp_path / "output",
            "redis_url": "redis://127.0.0.1:9/0",  # never reached by these routes
            "secrets_manager_secret_id": None,
            **overrides,
        }
    )
    return TestClient(create_app(configured))


@pytest.fixture
def bucket(settings: Settings) -> str:
    aws.client("s3", settings).create_bucket(Bucket="ecg-media-test")
    return "ecg-media-test"


def test_presigned_put_lands_under_uploads(settings: Settings, bucket: str, tmp_path: Path) -> None:
    client = _app(settings, tmp_path, workspace_backend="s3", s3_bucket=bucket)
    body = b"RIFF" + bytes(range(256)) * 64
    answer = client.post("/api/uploads/presigned", json={"bytes": len(body), "content_type": "audio/wav"}, headers=AUTH)
    assert answer.status_code == 201, answer.text
    presigned = answer.json()
    uid = upload_id(presigned["video_url"])
    assert uid is not None
    assert presigned["upload_url"].startswith(settings.aws_endpoint_url or "")
    assert "X-Amz-Signature=" in presigned["upload_url"]
    signed = presigned["upload_url"].split("X-Amz-SignedHeaders=")[1].split("&")[0]
    assert "content-length" in signed  # S3 refuses a body of another size

    put = httpx.put(presigned["upload_url"], content=body, headers=presigned["headers"], timeout=30)
    assert put.status_code == 200, put.text

    stored = aws.client("s3", settings).get_object(Bucket=bucket, Key=s3_key(uid))
    assert stored["Body"].read() == body
    assert stored["ContentType"] == "audio/wav"


def test_presigning_needs_a_key_and_a_sane_size(settings: Settings, bucket: str, tmp_path: Path) -> None:
    client = _app(settings, tmp_path, workspace_backend="s3", s3_bucket=bucket, max_download_bytes=1000)
    assert client.post("/api/uploads/presigned", json={"bytes": 10}).status_code == 401
    assert client.post("/api/uploads/presigned", json={"bytes": 1001}, headers=AUTH).status_code == 413
    assert client.post("/api/uploads/presigned", json={"bytes": 0}, headers=AUTH).status_code == 422
    assert (
        client.post("/api/uploads/presigned", json={"bytes": 5, "content_type": "x\r\ny"}, headers=AUTH).status_code
        == 422
    )


def test_local_mode_keeps_the_proxied_upload(settings: Settings, tmp_path: Path) -> None:
    client = _app(settings, tmp_path, workspace_backend="local", s3_bucket=None)
    answer = client.post("/api/uploads/presigned", json={"bytes": 10}, headers=AUTH)
    assert answer.status_code == 404 and "POST /api/uploads" in answer.text
    proxied = client.post("/api/uploads", content=b"media", headers=AUTH)
    assert proxied.status_code == 201 and upload_id(proxied.json()["video_url"])
