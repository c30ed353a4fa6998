"""AWS access for the shim, the workers and the metrics publisher.

One place builds boto3 clients, so every caller honours ``ECG_AWS_REGION`` and
``ECG_AWS_ENDPOINT_URL`` (a moto server or MinIO in tests and development). Secrets
reach the processes from AWS Secrets Manager at start-up, never from files baked
into an image: :func:`load_secrets_into_env` exports them before the settings are
read, and :func:`settings_with_secrets` does that and rebuilds the cached settings.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import threading
import time
import urllib.parse
from typing import Any

import boto3
import structlog
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ecg_audio.settings import Settings, get_settings

log = structlog.get_logger(__name__)

# The AWS SDKs' own variable for a non-default IMDS address; tests point it at a local server.
_IMDS_ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
_IMDS_DEFAULT_ENDPOINT = "http://169.254.169.254"
_EXPORTED_NAME_PREFIX = "ECG_"

# Short timeouts and the SDK's standard retry mode: a metrics call must never stall a job.
_CLIENT_CONFIG = Config(connect_timeout=5, read_timeout=15, retries={"mode": "standard", "max_attempts": 4})


_session_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _session() -> boto3.session.Session:
    # One session per process: a new one re-reads the service models from disk
    # (seconds for EC2). Sessions are not thread-safe, hence the lock in client().
    return boto3.session.Session()


def client(service: str, settings: Settings | None = None, *, config: Config | None = None) -> Any:
    """A boto3 client for ``service`` with the region and endpoint from the settings.

    Credentials come from boto3's usual chain (environment, instance profile). boto3
    clients are thread-safe; callers may keep one. ``config`` is merged over the
    defaults (e.g. ``Config(signature_version="s3v4")`` for presigned URLs).
    """
    settings = settings or get_settings()
    with _session_lock:
        return _session().client(
            service,  # type: ignore[call-overload]
            region_name=settings.aws_region,
            endpoint_url=settings.aws_endpoint_url,
            config=_CLIENT_CONFIG.merge(config) if config is not None else _CLIENT_CONFIG,
        )


def load_secrets_into_env(settings: Settings | None = None) -> list[str]:
    """Export the ``ECG_*`` keys of the configured Secrets Manager secret(s) into ``os.environ``.

    The secret is a JSON object such as ``{"ECG_API_KEYS": ["k1", "k2"],
    "ECG_CALLBACK_SIGNING_KEY": "…", "ECG_HF_TOKEN": "hf_…"}``. A variable already set
    to a non-empty value wins, so an operator can override one key. Strings are
    exported as they are; lists and other JSON values as JSON, which pydantic-settings
    parses for list fields. Keys without the ``ECG_`` prefix are ignored. Only names
    are logged, never values. ``ECG_SECRETS_MANAGER_SECRET_ID`` may name several
    secrets, comma-separated (the fleet stack keeps the operator's keys apart from the
    generated Redis URL): they are read in order, so the first one to set a key wins.

    Returns:
        The names that were exported (empty when no secret is configured).

    Raises:
        RuntimeError: a secret is configured but cannot be read or is not a JSON
            object. Starting without API keys or a signing key would be worse than
            not starting.
    """
    settings = settings or get_settings()
    secret_ids = [s.strip() for s in (settings.secrets_manager_secret_id or "").split(",") if s.strip()]
    exported: list[str] = []
    for secret_id in secret_ids:
        exported += _export_secret(secret_id, settings)
    return exported


def _export_secret(secret_id: str, settings: Settings) -> list[str]:
    try:
        response = client("secretsmanager", settings).get_secret_value(SecretId=secret_id)
    except (BotoCoreError, ClientError) as e:
        raise RuntimeError(
            f"cannot read secret {secret_id!r} from Secrets Manager: {e}; check "
            "ECG_SECRETS_MANAGER_SECRET_ID, the region and secretsmanager:GetSecretValue on the role"
        ) from e
    try:
        values = json.loads(response["SecretString"])
    except (KeyError, ValueError) as e:
        raise RuntimeError(f"secret {secret_id!r} must be a JSON object in SecretString") from e
    if not isinstance(values, dict):
        raise RuntimeError(f"secret {secret_id!r} must be a JSON object, not {type(values).__name__}")

    exported: list[str] = []
    kept: list[str] = []
    ignored: list[str] = []
    for name, value in values.items():
        if not name.startswith(_EXPORTED_NAME_PREFIX):
            ignored.append(name)
            continue
        if os.environ.get(name):
            kept.append(name)
            continue
        os.environ[name] = value if isinstance(value, str) else json.dumps(value)
        exported.append(name)
    log.info("secrets_loaded", secret_id=secret_id, exported=exported, kept_from_env=kept, ignored=ignored)
    return exported


def settings_with_secrets() -> Settings:
    """Load the secret (if any) into the environment, then return freshly read settings.

    Call once at process start (worker, shim, metrics publisher) before anything else
    reads :func:`get_settings`.
    """
    if load_secrets_into_env(get_settings()):
        get_settings.cache_clear()
    return get_settings()


class Imds:
    """A small IMDSv2 client: a session token from a PUT, then GETs that carry it.

    The token is kept until it expires or the service refuses it (401). Inside a
    container on the default bridge network the PUT response needs a hop limit of 2
    (the launch template in ``infra/worker-asg.yaml`` sets it).
    """

    _TOKEN_TTL_S = 6 * 3600

    def __init__(self, endpoint: str, timeout_s: float) -> None:
        url = urllib.parse.urlsplit(endpoint)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"instance metadata endpoint must be http://host[:port], not {endpoint!r}")
        self.endpoint = endpoint
        self._host, self._port = url.hostname, url.port or 80
        self._timeout_s = timeout_s
        self._token: str | None = None
        self._token_expires = 0.0

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
        connection = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout_s)
        try:
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    def _session_token(self) -> str:
        if self._token is None or time.monotonic() >= self._token_expires:
            status, body = self._request(
                "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": str(self._TOKEN_TTL_S)}
            )
            if status != 200:
                raise OSError(f"IMDSv2 token request answered {status}")
            # renew a minute early so a GET never carries a token about to lapse
            self._token, self._token_expires = body, time.monotonic() + self._TOKEN_TTL_S - 60
        return self._token

    def get(self, path: str) -> str | None:
        """The text at ``path`` (``/latest/meta-data/...``), or None when it does not exist (404).

        Raises:
            OSError, http.client.HTTPException: the service is unreachable or answers an error.
        """
        for _ in range(2):
            status, body = self._request("GET", path, {"X-aws-ec2-metadata-token": self._session_token()})
            if status == 401:  # token expired or the service restarted: get a new one once
                self._token = None
                continue
            if status == 404:
                return None
            if status != 200:
                raise OSError(f"IMDS GET {path} answered {status}")
            return body
        raise OSError(f"IMDS GET {path} refused a fresh token")


def imds(settings: Settings | None = None) -> Imds:
    """An :class:`Imds` at ``ECG_IMDS_ENDPOINT``, else the SDKs' variable, else the link-local address."""
    settings = settings or get_settings()
    endpoint = settings.imds_endpoint or os.environ.get(_IMDS_ENDPOINT_ENV, _IMDS_DEFAULT_ENDPOINT)
    return Imds(endpoint, settings.imds_timeout_s)


def instance_id(settings: Settings | None = None) -> str | None:
    """This machine's EC2 instance id: ``ECG_INSTANCE_ID``, else IMDSv2, else None.

    Off EC2 the request times out quickly and this returns None.
    """
    settings = settings or get_settings()
    if settings.instance_id:
        return settings.instance_id
    try:
        client_ = imds(settings)
        found = client_.get("/latest/meta-data/instance-id")
    except ValueError as e:
        log.warning("imds_endpoint_invalid", error=str(e))
        return None
    except (OSError, http.client.HTTPException) as e:
        log.info("imds_unavailable", error=str(e))
        return None
    return (found or "").strip() or None
