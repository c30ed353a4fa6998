"""Where a job's input and result files live, on S3 or on this machine.

The uploaded input (``upload://<id>``): ``s3://<bucket>/uploads/<id>`` with an S3 workspace (the shim
put it there; a HEAD tells gone from throttled), else ``<uploads_dir>/<id>``. Result files:
``s3://<bucket>/output/`` or the local output root.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.errors import DownloadError, InvalidMediaError
from tasks.stage_env import StageEnv

UPLOAD_GONE = "the uploaded file is gone (uploads are kept for a limited time: upload it again)"


def upload_source(url: str, env: StageEnv, policy: Any) -> tuple[str, Any]:
    """Where ``upload://<id>`` lives: ``s3://<bucket>/uploads/<id>`` with an S3 workspace (the
    shim put it there), else ``<uploads_dir>/<id>``; and the URL policy that admits it."""
    from ecg_audio.uploads import s3_key, upload_id

    upload = upload_id(url)
    if upload is None:
        raise InvalidMediaError("malformed upload id: expected upload://<32 hex digits>")
    if env.s3_bucket:
        from botocore.exceptions import ClientError

        try:
            env.s3().head_object(Bucket=env.s3_bucket, Key=s3_key(upload))
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code"))
            if code in {"404", "NoSuchKey", "NotFound"}:
                raise InvalidMediaError(UPLOAD_GONE) from None
            # throttled (503 SlowDown) or an S3 hiccup: the stage is retried, not failed as an internal error
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            retryable = not (isinstance(status, int) and 400 <= status < 500 and status not in (408, 429))
            raise DownloadError(f"the uploaded file could not be checked: S3 said {code}", retryable=retryable) from e
        # this one object, although uploads/ is no input location for jobs
        admit_s3 = dataclasses.replace(
            policy,
            allowed_schemes=frozenset(policy.allowed_schemes) | {"s3"},
            s3_inputs=(f"{env.s3_bucket}/{s3_key(upload)}",),
            s3_denied=(),
        )
        return f"s3://{env.s3_bucket}/{s3_key(upload)}", admit_s3
    if env.uploads_dir is None:
        raise InvalidMediaError("uploads are not enabled on this worker")
    path = env.uploads_dir / upload
    if not path.is_file():
        raise InvalidMediaError(UPLOAD_GONE)
    return str(path), dataclasses.replace(policy, allow_local_files=True)


def write_output(env: StageEnv, name: str, text: str) -> str:
    """Write a result file where results go: ``s3://bucket/output/`` or the local output root."""
    if env.s3_bucket:
        env.s3().put_object(Bucket=env.s3_bucket, Key=f"output/{name}", Body=text.encode())
        return f"s3://{env.s3_bucket}/output/{name}"
    env.output_root.mkdir(parents=True, exist_ok=True)
    path = env.output_root / name
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return str(path)
