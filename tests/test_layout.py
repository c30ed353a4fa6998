"""The design card's dependency rules, checked: the shim and the worker parent never import torch,
and pipeline/ knows neither Celery, FastAPI nor the settings object."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO


def _imports_torch_after(code: str) -> bool:
    probe = f"{code}\nimport sys\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1] == "True"


def test_shim_does_not_import_torch() -> None:
    assert not _imports_torch_after("import api_shim.app as a; a.create_app")


def test_worker_parent_does_not_import_torch() -> None:
    # the parent process imports the app and the task modules; models (and CUDA) live in the children
    assert not _imports_torch_after("import worker.app")


def test_pipeline_imports_no_framework_or_settings() -> None:
    banned = ("celery", "fastapi", "ecg_audio", "tasks", "worker", "api_shim", "redis")
    offenders = []
    for path in sorted((REPO / "pipeline").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in banned]
    assert offenders == []


def test_every_task_has_an_explicit_name() -> None:
    src = (REPO / "tasks" / "pipeline_tasks.py").read_text()
    tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "shared_task":
            assert any(k.arg == "name" for k in node.keywords), ast.unparse(node)
