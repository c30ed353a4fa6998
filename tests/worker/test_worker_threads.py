"""A worker's child computes with the configured threads and the compute type chosen from the
CPU, as an in-process run does (ecg.worker_info reports them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Proc, start_worker
from worker.cpu import auto_compute_type

pytestmark = pytest.mark.timeout(900)


def _worker_info(redis_url: str) -> dict[str, Any]:
    from celery import Celery

    import celeryconfig

    app = Celery("probe")
    app.config_from_object(celeryconfig)
    app.conf.broker_url = app.conf.result_backend = redis_url
    # the first answer comes once the child has loaded its models (minutes on a loaded machine)
    return dict(app.send_task("ecg.worker_info", queue="model").get(timeout=800))


def test_worker_models_get_the_configured_threads(stack_env: dict[str, str], redis_url: str, tmp_path: Path) -> None:
    # a database of its own: the session's shared worker must not answer for this one
    url = redis_url.rsplit("/", 1)[0] + "/5"
    # 1 thread: neither the default (every core) nor what OMP_NUM_THREADS or os.cpu_count() would give
    env = {**stack_env, "ECG_REDIS_URL": url, "ECG_CPU_THREADS": "1", "ECG_COMPUTE_TYPE": "auto"}
    env.pop("OMP_NUM_THREADS", None)
    proc: Proc = start_worker(env, tmp_path / "worker.log", name="threads")
    try:
        info = _worker_info(url)
    finally:
        proc.stop()
    assert info["pid"] != os.getpid()
    assert info["cpu_threads"] == 1
    assert info["threads"]["torch_threads"] == 1, info["threads"]
    assert info["compute_type"] == auto_compute_type("cpu")
    assert info["asr"], "the worker preloaded no ASR model"
    for name, asr in info["asr"].items():
        assert asr["cpu_threads"] == 1, (name, asr)
        assert asr["num_workers"] == 1, (name, asr)
        # CTranslate2 runs int8's non-quantized layers in float32 on a CPU
        assert asr["compute_type"] in {"int8_float32", "float32", "int8"}, (name, asr)
