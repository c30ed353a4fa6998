"""Issue 22: a stage delivery reads top-down as named steps, and no function in tasks/ outgrows a screen."""

from __future__ import annotations

import ast

from tests.conftest import REPO

MAX_TASKS_FUNCTION_LINES = 60


def test_no_function_in_tasks_is_over_60_lines() -> None:
    longest = []
    for path in sorted((REPO / "tasks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_TASKS_FUNCTION_LINES:
                    longest.append(f"tasks/{path.name}:{node.name} ({n} lines)")
    assert longest == []


def test_run_stage_task_calls_the_lifecycle_steps_in_order() -> None:
    tree = ast.parse((REPO / "tasks" / "pipeline_tasks.py").read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "run_stage_task")
    calls = [
        n
        for n in ast.walk(fn)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and getattr(n.func.value, "id", "") == "step"
    ]
    calls = [n.func.attr for n in sorted(calls, key=lambda n: (n.lineno, n.col_offset))]  # type: ignore[attr-defined]
    assert calls == ["load", "guard", "already_merged", "lease", "run", "record", "complete", "fail_or_retry"]
