"""Property-based fuzzing of the shim from its own OpenAPI document.

schemathesis reads ``/openapi.json`` and generates requests for every operation,
valid ones and invalid ones, with the API key. Whatever it sends, the shim must
never answer 5xx, and every documented response must match its schema.

The shim fuzzed here is a real uvicorn process with the same settings as the
session's shim except two, each for a reason:

* its Redis database is 1, not 0, so the jobs it accepts land in a keyspace and
  a queue that no worker consumes: they cannot collide with the table's job ids
  nor load the worker the other tests share;
* ``POST /transcribe`` waits 0.5 s, not 10 min, for jobs that nobody runs.

Besides the schema, every error answer must be RFC 9457 problem+json (``problem_json_errors``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from tests.conftest import API_KEY, Proc, free_port
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(600)

MIN_CASES = 500
# Per operation and mode: five operations with input, valid and invalid, land well above MIN_CASES.
EXAMPLES_PER_OPERATION = 120
AUTH = {"Authorization": f"Bearer {API_KEY}"}

_calls: dict[str, int] = {}
_statuses: dict[str, dict[int, int]] = {}


@pytest.fixture(scope="module")
def fuzz_shim(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    var = tmp_path_factory.mktemp("fuzz-var")
    env = dict(stack_env)
    env.update(
        {
            "ECG_REDIS_URL": stack_env["ECG_REDIS_URL"].rsplit("/", 1)[0] + "/1",
            "ECG_VAR_DIR": str(var),
            "ECG_WORKSPACE_ROOT": str(var / "workspaces"),
            "ECG_OUTPUT_ROOT": str(var / "output"),
            "ECG_TRANSCRIBE_WAIT_S": "0.5",
            "ECG_SPEAKER_ENROLL_WAIT_S": "0.5",  # no worker embeds samples here: 202, enrolling
            "ECG_LOG_LEVEL": "WARNING",  # thousands of refusals are not worth a log line each
        }
    )
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "fuzz-shim.log"
    proc = Proc(
        "fuzz-shim",
        [sys.executable, "-m", "uvicorn", "api_shim.app:app", "--host", "127.0.0.1", "--port", str(port)],
        env,
        log,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: proc.answers(url + "/health"), 120, interval=0.3, what=lambda: "fuzz shim:\n" + proc.tail())
    yield url
    proc.stop()
    log_text = Path(log).read_text(errors="replace")
    assert "Traceback" not in log_text, "the fuzzed shim logged a crash:\n" + proc.tail(80)


@pytest.fixture(scope="module")
def api_schema(fuzz_shim: str) -> Any:
    return schemathesis.openapi.from_url(fuzz_shim + "/openapi.json", headers=AUTH, timeout=10)


# Listed here so each (operation, mode) is its own test; test_every_operation_is_fuzzed keeps the
# list honest against the served document.
OPERATIONS = [
    ("POST", "/api/upload-video/process-video"),
    ("POST", "/transcribe"),
    ("GET", "/jobs"),
    ("GET", "/jobs/{job_id}"),
    ("DELETE", "/jobs/{job_id}"),
    ("GET", "/jobs/{job_id}/result"),
    ("GET", "/jobs/{job_id}/exports/{fmt}"),
    ("GET", "/jobs/{job_id}/events"),
    ("GET", "/jobs/{job_id}/view"),
    ("GET", "/jobs/{job_id}/view/data"),
    ("GET", "/jobs/{job_id}/view/live"),
    ("GET", "/jobs/{job_id}/view/exports/{fmt}"),
    ("POST", "/api/uploads"),
    ("POST", "/api/uploads/presigned"),
    ("POST", "/v1/audio/transcriptions"),
    ("POST", "/v1/stream/token"),
    ("GET", "/health"),
    ("GET", "/health/live"),
    ("GET", "/health/ready"),
    ("POST", "/speakers"),
    ("GET", "/speakers"),
    ("GET", "/speakers/{speaker_id}"),
    ("PATCH", "/speakers/{speaker_id}"),
    ("DELETE", "/speakers/{speaker_id}"),
    ("GET", "/webhooks/secret"),
    ("POST", "/webhooks/secret/rotate"),
    ("POST", "/jobs/{job_id}/callbacks/replay"),
]


JOB_ROUTES = {"/api/upload-video/process-video", "/transcribe"}


def _acceptable(drawn: tuple[Any, bool, bytes]) -> Any:
    case, flip, upload_id = drawn
    if flip and isinstance(case.body, dict):
        case.body["video_url"] = f"upload://{upload_id.hex()}"
        case.body.pop("callback_url", None)
    return case


def problem_json_errors(ctx: Any, response: Any, case: Any) -> None:
    """Every 4xx and 5xx answers RFC 9457 problem+json with a stable code."""
    if response.status_code < 400:
        return
    kind = response.headers.get("content-type", [""])
    kind = kind[0] if isinstance(kind, list) else kind
    assert kind.startswith("application/problem+json"), (response.status_code, kind)
    body = response.json()
    assert body["status"] == response.status_code and body["title"] and body["code"], body


def test_every_operation_is_fuzzed(api_schema: Any) -> None:
    served = {(op.method.upper(), op.path) for op in (r.ok() for r in api_schema.get_all_operations())}
    assert served == set(OPERATIONS)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz(api_schema: Any, fuzz_shim: str, method: str, path: str, mode: GenerationMode) -> None:
    operation = api_schema[path][method]
    if mode is GenerationMode.NEGATIVE and not (operation.body or operation.path_parameters):
        pytest.skip("an operation with no input has no invalid input to generate")
    label = f"{method} {path} {mode}"
    session = requests.Session()

    strategy = operation.as_strategy(generation_mode=mode)
    if mode is GenerationMode.POSITIVE and path in JOB_ROUTES:
        # a random video_url is practically never acceptable (the shim resolves it), so half the valid
        # cases name a well-formed upload id: the accept, idempotent-repeat and JobState paths get fuzzed too
        strategy = st.tuples(strategy, st.booleans(), st.binary(min_size=16, max_size=16)).map(_acceptable)

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,  # no .hypothesis/ directory in the repository
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
    )
    def run(case: Any) -> None:
        _calls[label] = _calls.get(label, 0) + 1
        response = case.call_and_validate(
            base_url=fuzz_shim,
            session=session,
            headers=AUTH,
            timeout=30,
            checks=[not_a_server_error, response_schema_conformance, content_type_conformance, problem_json_errors],
        )
        seen = _statuses.setdefault(label, {})
        seen[response.status_code] = seen.get(response.status_code, 0) + 1

    run()


def test_enough_cases_were_generated() -> None:
    total = sum(_calls.values())
    sys.stderr.write(f"\nschemathesis: {total} cases; status codes per operation and mode: {_statuses}\n")
    assert total >= MIN_CASES, _calls
