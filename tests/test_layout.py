"""The design card's dependency rules, checked: the shim and the worker parent never import torch,
pipeline/ knows neither Celery, FastAPI nor the settings object, imports run down the layers
without cycles, no module or function grows past what a reader takes in at once, and the tests
mirror the packages (tests/system, the slow end-to-end runs, apart)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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
    for path in sorted((REPO / "pipeline").rglob("*.py")):
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


# --- layers -------------------------------------------------------------------------------
# Each top-level package is one layer; a layer imports only the layers listed for it (and
# itself). From the ground up:
#   pipeline   stage code over audio and models (no framework, no settings); its errors and
#              speech types are the vocabulary every layer above speaks
#   core       ecg_audio/ + celeryconfig: settings, job records, events and callbacks, the
#              chain message, the stage table, queues, languages and messages (torch-free)
#   media_io   fetching inputs under the URL policy, the job workspace (local or S3)
#   ops        AWS clients and secrets, CloudWatch metrics, the local stack
#   tasks      stage bodies and Celery tasks
#   worker     the worker process: app, model registry, liveness, scaling, operator commands
#   api_shim   the HTTP shim
#   ecg_cli    the `ecg-audio` command (in-process runner included)
#   bench      measurements, over everything
LAYERS: dict[str, set[str]] = {
    "pipeline": set(),
    "core": {"pipeline"},
    "media_io": {"pipeline", "core"},
    "ops": {"pipeline", "core"},  # pipeline.errors: the job error codes the metrics count
    "tasks": {"pipeline", "core", "media_io", "ops"},
    "worker": {"pipeline", "core", "media_io", "ops", "tasks"},
    "api_shim": {"pipeline", "core", "media_io", "ops"},
    "ecg_cli": {"pipeline", "core", "media_io", "ops", "tasks", "worker"},
    "bench": {"pipeline", "core", "media_io", "ops", "tasks", "worker", "api_shim", "ecg_cli"},
}
PACKAGE_LAYER = {"ecg_audio": "core", "celeryconfig": "core"} | {name: name for name in LAYERS if name != "core"}
# Imports that cross the rules today, each with its way out. The tests below fail when one
# disappears, so that the entry goes too.
KNOWN_CROSSINGS: set[tuple[str, str]] = set()
KNOWN_CYCLES: set[frozenset[str]] = set()
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 120
KNOWN_OVERSIZE: set[str] = set()


def _source_files() -> list[Path]:
    files = [REPO / "celeryconfig.py"]
    for package in PACKAGE_LAYER:
        if (REPO / package).is_dir():
            files += sorted((REPO / package).rglob("*.py"))
    return files


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, submodules: bool = False) -> list[str]:
    """Every absolute import of the file, the ones inside functions included (``submodules``:
    with ``from package import name``, also ``package.name``, which may be a module)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            if submodules:
                names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_imports_run_down_the_layers() -> None:
    crossings = set()
    for path in _source_files():
        layer = PACKAGE_LAYER[path.relative_to(REPO).parts[0].removesuffix(".py")]
        for name in _imports(path):
            target = PACKAGE_LAYER.get(name.split(".")[0])
            if target is not None and target != layer and target not in LAYERS[layer]:
                crossings.add((str(path.relative_to(REPO)), name))
    assert crossings == KNOWN_CROSSINGS


def test_no_import_cycles_between_modules() -> None:
    modules = {_module_name(p): p for p in _source_files()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path, submodules=True) if m in modules and m != name}
    # strongly connected components (Tarjan): every one of more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.add(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == KNOWN_CYCLES


def test_no_module_or_function_is_too_long() -> None:
    too_long = set()
    for path in _source_files():
        rel = str(path.relative_to(REPO))
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.add(rel)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if (node.end_lineno or first) - first + 1 > MAX_FUNCTION_LINES:
                    too_long.add(f"{rel}:{node.name}")
    assert too_long == KNOWN_OVERSIZE


# --- tests mirror the packages ------------------------------------------------------------
# tests/<package>/ tests <package>/ (a folder below it mirrors the folder of the same path), and
# tests/system/ holds the whole-fleet, chaos and language end-to-end runs, each module marked
# slow (`make test-quick` leaves them out). Flat in tests/: this file and the shared helpers, no
# other test module. Every folder is a package (tests import each other as tests.<pkg>.<mod>).
TESTS = REPO / "tests"
SYSTEM = "system"


def _test_modules() -> list[Path]:
    return sorted(p for p in TESTS.rglob("test_*.py") if "__pycache__" not in p.parts)


def _marks(node: ast.expr) -> list[str]:
    """The names of the ``pytest.mark.<name>`` in a mark expression (one mark, a list or a tuple)."""
    items = node.elts if isinstance(node, ast.List | ast.Tuple) else [node]
    names = []
    for item in items:
        target = item.func if isinstance(item, ast.Call) else item
        if isinstance(target, ast.Attribute) and ast.unparse(target.value) == "pytest.mark":
            names.append(target.attr)
    return names


def _module_marks(tree: ast.Module) -> list[str]:
    marks: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
            marks += _marks(node.value)
    return marks


def test_every_test_module_lives_in_the_folder_of_the_package_it_tests() -> None:
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests"}
    misplaced = []
    for path in _test_modules():
        rel = path.relative_to(TESTS)
        if len(rel.parts) == 1:
            if rel.name != "test_layout.py":
                misplaced.append(f"{rel}: flat in tests/ (move it to tests/<package>/ or tests/{SYSTEM}/)")
            continue
        top, folders = rel.parts[0], rel.parts[:-1]
        if top != SYSTEM and (top not in packages or not (REPO / Path(*folders)).is_dir()):
            misplaced.append(f"{rel}: tests/{'/'.join(folders)}/ mirrors no package folder nor is tests/{SYSTEM}/")
        for depth in range(1, len(folders) + 1):
            if not (TESTS / Path(*folders[:depth]) / "__init__.py").is_file():
                misplaced.append(f"{rel}: tests/{'/'.join(folders[:depth])}/ has no __init__.py")
    assert misplaced == []


def test_system_tests_are_marked_slow() -> None:
    unmarked = [
        str(path.relative_to(TESTS))
        for path in _test_modules()
        if path.relative_to(TESTS).parts[0] == SYSTEM and "slow" not in _module_marks(ast.parse(path.read_text()))
    ]
    assert unmarked == [], "tests/system modules need pytestmark = [pytest.mark.slow, ...]"


def test_tests_that_take_the_real_worker_are_slow() -> None:
    """The session's ``worker`` fixture starts a worker with the models: a test outside tests/system
    that takes it is marked slow too, so that the quick run never starts one."""
    unmarked = []
    for path in _test_modules():
        tree = ast.parse(path.read_text())
        if "slow" in _module_marks(tree):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                takes_worker = any(a.arg == "worker" for a in node.args.args + node.args.kwonlyargs)
                marked = any("slow" in _marks(d) for d in node.decorator_list)
                if takes_worker and not marked:
                    unmarked.append(f"{path.relative_to(TESTS)}::{node.name}")
    assert unmarked == []
