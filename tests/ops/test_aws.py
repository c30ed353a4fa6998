from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from ecg_audio.settings import Settings
from ops import aws
from tests.conftest import free_port
from tests.helpers import make_settings


def test_client_uses_endpoint_and_region(settings: Settings) -> None:
    s3 = aws.client("s3", settings)

    assert s3.meta.endpoint_url == settings.aws_endpoint_url
    assert s3.meta.region_name == "us-east-1"
    s3.create_bucket(Bucket="ecg-test")
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["ecg-test"]


def test_secrets_are_exported_without_overriding(settings: Settings, monkeypatch, capsys) -> None:
    secret = {
        "ECG_API_KEYS": ["key-one", "key-two"],
        "ECG_CALLBACK_SIGNING_KEY": "sign-me-0123456789",
        "ECG_HF_TOKEN": "hf_from_secret",
        "UNRELATED": "ignored",
    }
    aws.client("secretsmanager", settings).create_secret(Name="ecg/test", SecretString=json.dumps(secret))
    for name in ("ECG_API_KEYS", "ECG_CALLBACK_SIGNING_KEY", "UNRELATED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ECG_HF_TOKEN", "hf_from_operator")

    exported = aws.load_secrets_into_env(settings.model_copy(update={"secrets_manager_secret_id": "ecg/test"}))

    import os

    assert sorted(exported) == ["ECG_API_KEYS", "ECG_CALLBACK_SIGNING_KEY"]
    assert os.environ["ECG_HF_TOKEN"] == "hf_from_operator"
    assert "UNRELATED" not in os.environ
    loaded = make_settings()
    assert [k.get_secret_value() for k in loaded.api_keys] == ["key-one", "key-two"]
    assert loaded.callback_signing_key is not None
    assert loaded.callback_signing_key.get_secret_value() == "sign-me-0123456789"
    out = capsys.readouterr()
    assert "sign-me" not in out.out + out.err and "key-one" not in out.out + out.err


def test_several_secrets_are_read_in_order(settings: Settings, monkeypatch) -> None:
    """The fleet stack keeps the operator's keys and its generated Redis URL in two secrets."""
    secrets = aws.client("secretsmanager", settings)
    app = secrets.create_secret(Name="ecg/app", SecretString=json.dumps({"ECG_HF_TOKEN": "hf_app"}))["ARN"]
    redis_url = "rediss://ecg:token@redis.internal:6379/0"
    both = json.dumps({"ECG_REDIS_URL": redis_url, "ECG_HF_TOKEN": "hf_second"})
    second = secrets.create_secret(Name="ecg/redis", SecretString=both)["ARN"]
    for name in ("ECG_HF_TOKEN", "ECG_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)

    ids = f"{app}, {second}"
    exported = aws.load_secrets_into_env(settings.model_copy(update={"secrets_manager_secret_id": ids}))

    import os

    assert exported == ["ECG_HF_TOKEN", "ECG_REDIS_URL"]
    assert os.environ["ECG_HF_TOKEN"] == "hf_app"  # the first secret wins a key
    assert make_settings().redis_url == redis_url


def test_no_secret_configured_is_a_no_op(settings: Settings) -> None:
    assert aws.load_secrets_into_env(settings) == []


def test_unreadable_secret_stops_start_up(settings: Settings) -> None:
    with pytest.raises(RuntimeError, match="cannot read secret"):
        aws.load_secrets_into_env(settings.model_copy(update={"secrets_manager_secret_id": "missing"}))


class _Imds(BaseHTTPRequestHandler):
    """Just enough IMDSv2: a token from PUT, the instance id only with that token."""

    def do_PUT(self) -> None:
        assert self.path == "/latest/api/token"
        self._reply(200, b"token-123")

    def do_GET(self) -> None:
        ok = self.path == "/latest/meta-data/instance-id" and self.headers["X-aws-ec2-metadata-token"] == "token-123"
        self._reply(200 if ok else 401, b"i-0abc" if ok else b"")

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def imds(monkeypatch) -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Imds)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint)
    yield endpoint
    server.shutdown()
    server.server_close()


def test_instance_id_from_imdsv2(imds: str) -> None:
    assert aws.instance_id(make_settings(instance_id=None)) == "i-0abc"


def test_instance_id_setting_wins(imds: str) -> None:
    assert aws.instance_id(make_settings(instance_id="i-configured")) == "i-configured"


def test_instance_id_off_ec2_is_none(monkeypatch) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    assert aws.instance_id(make_settings(instance_id=None, imds_timeout_s=0.5)) is None
