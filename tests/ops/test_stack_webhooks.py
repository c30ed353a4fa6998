"""``ecg-audio up`` signs callbacks: it generates the webhook root key once (0600, in var/) and hands it to
every process it starts; an ``ECG_CALLBACK_SIGNING_KEY`` from the environment wins."""

from __future__ import annotations

import stat
from pathlib import Path

from ops.stack import Stack, webhook_root_key


def test_root_key_generated_once_private_and_stable(tmp_path: Path) -> None:
    first = webhook_root_key(tmp_path / "var")
    assert len(first) >= 40
    path = tmp_path / "var" / "webhook-root.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert webhook_root_key(tmp_path / "var") == first  # the same after a restart: secrets stay valid
    assert webhook_root_key(tmp_path / "other") != first


def test_stack_env_carries_the_signing_key(tmp_path: Path) -> None:
    from ecg_audio.settings import Settings

    stack = Stack(tmp_path, "redis://127.0.0.1:1/0", 1, 2, "k", signing_key=webhook_root_key(tmp_path))
    env = stack.env()
    assert env["ECG_CALLBACK_SIGNING_KEY"] == webhook_root_key(tmp_path)
    s = Settings(_env_file=None, callback_signing_key=env["ECG_CALLBACK_SIGNING_KEY"])  # type: ignore[call-arg]
    assert s.callback_signing_key is not None
