"""``ecg-audio up`` → ``submit --wait`` → ``down``: what ``make demo`` does, on free ports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_up_submit_down(tmp_path: Path, sample_wav: Path) -> None:
    cli = [sys.executable, "-m", "ecg_cli"]  # the installed console script may point at another tree
    var = tmp_path / "var"
    env = dict(os.environ)
    env["ECG_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: up starts its own Redis
    env.pop("ECG_API_KEYS", None)
    port, flower_port = free_port(), free_port()
    up = subprocess.run([*cli, "up", "--detach", "--var-dir", str(var), "--port", str(port),
                         "--flower-port", str(flower_port)], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert (var / "stack.env").stat().st_mode & 0o077 == 0  # the key file is private
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["workers"] == 1
        assert httpx.get(f"http://127.0.0.1:{flower_port}/", timeout=5).status_code == 401
        sub = subprocess.run([*cli, "submit", str(sample_wav), "--wait", "--var-dir", str(var)], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=600)
        assert sub.returncode == 0, sub.stderr[-3000:]
        assert sub.stdout.startswith("2 speakers"), sub.stdout
        assert "SPEAKER_00:" in sub.stdout and "SPEAKER_01:" in sub.stdout
        redis_conf = (var / "redis").is_dir() and any((var / "redis").iterdir())
        assert redis_conf, "up did not start its own Redis with AOF"
    finally:
        down = subprocess.run([*cli, "down", "--var-dir", str(var)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
    assert "worker" in down.stdout and "redis" in down.stdout, down.stdout + down.stderr
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_worker_allocator_env_preloads_jemalloc_with_a_valid_conf(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``ecg-audio up`` gives its workers: jemalloc, with a MALLOC_CONF it accepts."""
    from ops.stack import JEMALLOC, JEMALLOC_CONF, worker_allocator_env

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    monkeypatch.setenv("ECG_WORKER_MALLOC", "system")
    assert worker_allocator_env() == {}
    monkeypatch.delenv("ECG_WORKER_MALLOC")
    if not any(Path(p).is_file() for p in JEMALLOC):
        assert worker_allocator_env() == {}
        pytest.skip("libjemalloc2 is not installed (make system-deps installs it): only the opt-out was checked")
    env = worker_allocator_env()
    assert env["MALLOC_CONF"] == JEMALLOC_CONF
    monkeypatch.setenv("MALLOC_CONF", "narenas:2")  # an operator's own conf wins
    assert worker_allocator_env()["MALLOC_CONF"] == "narenas:2"
    monkeypatch.setenv("LD_PRELOAD", env["LD_PRELOAD"])  # already preloaded: left alone
    assert worker_allocator_env() == {}
    # a child on that environment really runs jemalloc, and jemalloc takes the conf without complaint
    # (it prints "<jemalloc>: Invalid conf pair" on stderr for an option it does not know)
    probe = (
        "import ctypes; print(open('/proc/self/maps').read().count('libjemalloc') > 0); "
        "ctypes.CDLL(None).malloc(64 << 20)"
    )
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "True"
    assert "jemalloc" not in out.stderr, out.stderr
