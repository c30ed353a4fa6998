"""Each fact is written once: status names, Redis key names, locales, error codes. These tests
are the greps that find no second spelling in the product's code."""

from __future__ import annotations

import re
from pathlib import Path

from ecg_audio import job_events, jobs
from ecg_audio.jobs import JobStatus
from ecg_audio.messages import ERRORS, LOCALES, MESSAGES
from pipeline import errors

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ("api_shim", "ecg_audio", "ecg_cli", "media_io", "ops", "pipeline", "tasks", "worker")


def _sources(skip: str = "") -> dict[str, str]:
    files = [p for pkg in PRODUCT for p in (REPO / pkg).rglob("*.py")] + [REPO / "celeryconfig.py"]
    return {str(p.relative_to(REPO)): p.read_text() for p in files if str(p.relative_to(REPO)) != skip}


def _code_lines(text: str) -> list[str]:
    """Lines that are code: comments and docstring-like ``backticked`` mentions left out."""
    return [line for line in text.splitlines() if not line.lstrip().startswith("#") and "``" not in line]


def test_status_names_are_spelled_only_by_job_status() -> None:
    names = "|".join(s.value for s in JobStatus)
    spelled = re.compile(rf"""["']({names})["']""")
    found = [
        (name, line.strip())
        for name, text in _sources(skip="ecg_audio/job_events.py").items()
        for line in _code_lines(text)
        if spelled.search(line)
    ]
    assert found == []


def test_lua_scripts_take_status_names_from_the_generated_header() -> None:
    scripts = {"EMIT": job_events.EMIT_LUA, "UPDATE": jobs._UPDATE_LUA, "CREATE": jobs._CREATE_LUA}
    scripts["REQUEUE"] = jobs._REQUEUE_LUA
    for name, script in scripts.items():
        header, _, body = script.partition("local TERMINAL = ")
        assert all(f'local {s.name} = "{s.value}"' in header for s in JobStatus), name
        assert not re.search("'({})'".format("|".join(s.value for s in JobStatus)), body), name
    assert 'local OWNER_PREFIX = "ecg:jobs:owner:"' in jobs._CREATE_LUA  # key prefixes likewise


def test_redis_key_names_live_in_one_module() -> None:
    found = [
        (name, line.strip())
        for name, text in _sources(skip="ecg_audio/keys.py").items()
        for line in _code_lines(text)
        if re.search(r"""["']ecg:""", line)
    ]
    assert found == []


def test_error_codes_are_the_error_classes_and_each_has_its_text() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.AnalysisError)]
    codes = {c.code for c in classes}
    assert "STAGE_CRASHED" in codes and not hasattr(errors, "ERROR_CODES")
    assert set(ERRORS) == codes
    alternatives = "|".join(codes)
    spelled = re.compile(rf"""["']({alternatives})["']""")
    found = [
        (name, line.strip())
        for name, text in _sources(skip="pipeline/errors.py").items()
        for line in _code_lines(text)
        if spelled.search(line)
    ]
    assert found == []


def test_locales_are_spelled_once() -> None:
    assert set(LOCALES) == {"en", "ko"} and all(set(t) >= set(LOCALES) for t in MESSAGES.values())
    pair = re.compile(r"""[\[(]\s*["'](en|ko)["'],\s*["'](en|ko)["']""")  # a list, tuple or Literal of them
    found = [name for name, text in _sources(skip="ecg_audio/messages.py").items() if pair.search(text)]
    assert found == []
