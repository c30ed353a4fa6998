"""Helpers shared by the tests: Settings for moto."""

from __future__ import annotations

import urllib.request
from typing import Any

from ecg_audio.settings import Settings

REGION = "us-east-1"


def make_settings(**overrides: Any) -> Settings:
    """``Settings`` from the environment plus ``overrides``.

    Through ``**overrides`` because mypy, without the pydantic plugin, takes the
    fields declared as ``Field(<default>, ...)`` for required arguments.
    """
    return Settings(**overrides)


def reset_moto(endpoint: str) -> None:
    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).close()


def aws_settings(endpoint: str) -> Settings:
    return make_settings(
        aws_region=REGION,
        aws_endpoint_url=endpoint,
        worker_asg_name="ecg-workers-test",
        metrics_namespace="ECG/AudioAnalysis",
        secrets_manager_secret_id=None,
        instance_id=None,
    )
