"""s3:// inputs: fetched with the worker's S3 client under a size cap, with one answer for a
missing object and a forbidden one (an error must not probe the bucket); and the local name
an input is saved under."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from media_io.urlguard import CheckedUrl, redact_url, s3_bucket_and_key
from pipeline.errors import DownloadError

MEDIA_EXTENSIONS = frozenset(
    {
        ".aac", ".aif", ".aiff", ".amr", ".avi", ".flac", ".flv", ".m4a", ".m4v", ".mka", ".mkv",
        ".mov", ".mp3", ".mp4", ".mpeg", ".mpg", ".oga", ".ogg", ".ogv", ".opus", ".ts", ".wav",
        ".weba", ".webm", ".wma", ".wmv", ".3gp",
    }
)  # fmt: skip
# 408/425/429 (and 5xx) are worth another try; the other 4xx and these S3 codes are final
RETRYABLE_4XX = frozenset({408, 425, 429})
_S3_PERMANENT_CODES = frozenset(
    {"NoSuchKey", "NoSuchBucket", "404", "403", "AccessDenied", "InvalidBucketName", "InvalidObjectState"}
)
_S3_HIDDEN_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "404", "403", "AccessDenied", "NotFound"})


def media_filename(ext_hint: str | None, *paths: str) -> str:
    """``input`` plus a known media extension: the hint's, else the first URL path or key that has one."""
    suffixes = ["." + ext_hint.lstrip(".").lower()] if ext_hint else []
    for path in paths:
        path = urlsplit(path).path if "://" in path else path
        suffixes.append(PurePosixPath(unquote(path)).suffix.lower())
    return next((f"input{suffix}" for suffix in suffixes if suffix in MEDIA_EXTENSIONS), "input")


def fetch_s3(
    checked: CheckedUrl,
    dest_dir: Path,
    max_bytes: int,
    s3_client_factory: Callable[[], Any] | None,
    progress: Callable[[int], None] | None,
) -> Path:
    if s3_client_factory is None:
        raise DownloadError("s3:// input needs an S3 client, and this fetcher was given none", retryable=False)
    try:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
    except ImportError as e:
        raise RuntimeError("s3:// input requires boto3 (pip install boto3)") from e
    bucket, key = s3_bucket_and_key(checked)
    shown = redact_url(checked.url)
    client = s3_client_factory()
    target = dest_dir / media_filename(None, key)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        size = int(head.get("ContentLength") or 0)
        if size > max_bytes:
            raise DownloadError(f"{shown} is {size} bytes, over the {max_bytes}-byte limit", retryable=False)
        fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=".tmp-", suffix="-" + target.name)
        os.close(fd)
        tmp = Path(tmp_name)
        written = 0

        def on_bytes(count: int) -> None:
            nonlocal written
            written += count
            if written > max_bytes:  # the object grew after the HEAD
                raise DownloadError(f"{shown} exceeded the {max_bytes}-byte limit", retryable=False)
            if progress is not None:
                progress(written)

        try:
            client.download_file(bucket, key, str(tmp), Callback=on_bytes)
            if tmp.stat().st_size > max_bytes:
                raise DownloadError(f"{shown} exceeded the {max_bytes}-byte limit", retryable=False)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except ClientError as e:
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        permanent = code in _S3_PERMANENT_CODES or (
            isinstance(status, int) and 400 <= status < 500 and status not in RETRYABLE_4XX
        )
        if code in _S3_HIDDEN_CODES or status in (403, 404):
            # one answer for "no such object" and "not yours": an error must not probe the bucket
            message = f"{shown} could not be fetched: no such object, or not readable"
            raise DownloadError(message, retryable=False) from e
        raise DownloadError(f"{shown} could not be fetched: S3 said {code or status}", retryable=not permanent) from e
    except NoCredentialsError as e:
        raise DownloadError(f"{shown} could not be fetched: no S3 credentials configured", retryable=False) from e
    except BotoCoreError as e:
        raise DownloadError(f"{shown} could not be fetched: {type(e).__name__}", retryable=True) from e
    return target
