"""s3:// inputs: only the configured input locations, never the workspace (other jobs' temp/,
output/, uploads/), refused before any S3 call and with one message whether the object exists or
not; a throttled S3 HEAD is a retryable fault, not an internal error."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from media_io.fetch import FetchLimits, fetch_to_file
from media_io.urlguard import UrlRefused
from pipeline.errors import DownloadError


class RecordingS3:
    """Counts every call; any call at all is a failure of the guard under test."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            self.calls.append(name)
            raise AssertionError(f"S3 was called: {name}")

        return call


def _worker_policy(**settings: Any) -> Any:
    from ecg_audio.settings import Settings
    from media_io.policy import url_policy

    return url_policy(Settings(**settings))


@pytest.mark.parametrize(
    "url",
    [
        "s3://ecg-work/temp/other-job/audio.wav",  # another job's audio
        "s3://ecg-work/output/other-job.json",
        "s3://ecg-work/uploads/0123456789abcdef0123456789abcdef",
        "s3://ecg-work/calls/x.wav",  # the workspace bucket, outside the input prefix
        "s3://somebody-elses-bucket/x.wav",
        "s3://media-in/private/x.wav",  # the input bucket, outside the input prefix
    ],
)
def test_s3_outside_input_locations_refused_before_any_call(url: str, tmp_path: Path) -> None:
    s3 = RecordingS3()
    policy = _worker_policy(s3_bucket="ecg-work", s3_input_prefixes=["media-in/calls/"])
    with pytest.raises(UrlRefused) as e:
        fetch_to_file(url, tmp_path, policy=policy, limits=FetchLimits(), s3_client_factory=lambda: s3)
    assert s3.calls == []
    assert e.value.message.endswith("is not in an allowed input location; refused")  # the same for every case


def test_s3_workspace_refused_even_when_its_bucket_is_an_input(tmp_path: Path) -> None:
    s3 = RecordingS3()
    policy = _worker_policy(s3_bucket="ecg-work", s3_input_prefixes=["ecg-work"])
    with pytest.raises(UrlRefused):
        url = "s3://ecg-work/temp/j/audio.wav"
        fetch_to_file(url, tmp_path, policy=policy, limits=FetchLimits(), s3_client_factory=lambda: s3)
    assert s3.calls == []


def test_no_s3_input_unless_configured() -> None:
    from media_io.urlguard import check_url

    with pytest.raises(UrlRefused):
        check_url("s3://media-in/calls/a.wav", _worker_policy())
    assert check_url("s3://media-in/calls/a.wav", _worker_policy(s3_input_prefixes=["media-in"])).host == "media-in"


def test_missing_and_forbidden_objects_get_the_same_message(tmp_path: Path) -> None:
    from botocore.exceptions import ClientError

    class S3:
        def __init__(self, code: str, status: int) -> None:
            self.code, self.status = code, status

        def head_object(self, **_: Any) -> Any:
            raise ClientError(
                {"Error": {"Code": self.code}, "ResponseMetadata": {"HTTPStatusCode": self.status}}, "HeadObject"
            )

    policy = _worker_policy(s3_input_prefixes=["media-in"])
    messages = set()
    for code, status in (("404", 404), ("403", 403), ("AccessDenied", 403), ("NoSuchBucket", 404)):
        with pytest.raises(DownloadError) as e:
            fetch_to_file(
                "s3://media-in/x.wav", tmp_path, policy=policy, limits=FetchLimits(),
                s3_client_factory=lambda c=code, s=status: S3(c, s),
            )
        assert not e.value.retryable
        messages.add(e.value.message)
    assert len(messages) == 1, messages


def test_throttled_upload_head_is_retryable() -> None:
    """upload:// on an S3 workspace starts with a HEAD; S3 answering 503 SlowDown must be a retryable
    download fault (the stage is retried), not an internal error that fails the job."""
    from botocore.exceptions import ClientError

    from tasks.storage import upload_source

    class Throttled:
        def head_object(self, **_: Any) -> Any:
            raise ClientError(
                {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "HeadObject"
            )

    env = SimpleNamespace(s3_bucket="ecg-work", s3=lambda: Throttled())
    with pytest.raises(DownloadError) as e:
        upload_source("upload://" + "a" * 32, env, _worker_policy(s3_bucket="ecg-work"))  # type: ignore[arg-type]
    assert e.value.retryable


def test_shim_refuses_another_jobs_temp_at_submission_without_s3(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acceptance 3: POST with s3://<workspace bucket>/temp/<other job>/audio.wav is refused with a
    4xx, no job is created and S3 is never called (the shim's S3 client would count the call)."""
    import uuid

    import boto3
    from fastapi.testclient import TestClient

    from api_shim.app import create_app
    from ecg_audio.jobs import JobStore
    from ecg_audio.settings import Settings

    calls: list[str] = []
    monkeypatch.setattr(boto3, "client", lambda *a, **k: calls.append("client") or RecordingS3())
    key = "iso-key-0123456789abcdef"
    settings = Settings(
        api_keys=[key], redis_url=redis_url, workspace_root=tmp_path / "ws", s3_bucket="ecg-work",
        workspace_backend="s3", s3_input_prefixes=["media-in/calls/"],
    )
    client = TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"})
    job = f"iso-{uuid.uuid4().hex[:8]}"
    for url in ("s3://ecg-work/temp/other-job/audio.wav", "s3://ecg-work/output/other-job.json"):
        r = client.post("/api/upload-video/process-video", json={"job_id": job, "video_url": url})
        assert 400 <= r.status_code < 500, r.text
        assert "not in an allowed input location" in r.text, r.text
    assert JobStore.from_url(redis_url).get(job) is None
    assert calls == []
