"""The shortened chaos bench: real workers killed, Redis restarted, receiver down, OOM injected."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.timeout(1200)


def test_chaos_quick() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "chaos.py"), "--quick"],
        cwd=REPO, capture_output=True, text=True, timeout=1150,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print("chaos:", json.dumps(out))
    kill = out["kill"]
    assert kill["completed"] == kill["jobs"] and kill["lost"] == 0 and kill["failed"] == 0, kill
    assert kill["results_equal"] == kill["jobs"] and kill["one_final_callback"] == kill["jobs"], kill
    assert kill["stages_recomputed"] == 0, kill
    assert out["redis"]["completed"] == out["redis"]["jobs"], out["redis"]
    rcv = out["receiver"]
    assert rcv["jobs_with_final"] == rcv["jobs"] and rcv["final_duplicates"] == 0, rcv
    assert out["sigterm"] == {"completed": 1, "lost": 0}
    many = out["many"]
    assert many["completed"] == many["jobs"] and many["duplicates"] == 0, many
    oom = out["oom"]
    assert oom["completed"] == 1 and any("retried with" in n for n in oom["notes"]), oom
    spot = out["spot"]  # a spot notice mid-stage: handed back at once, finished elsewhere from its checkpoint
    assert spot["completed"] == 1 and spot["lost"] == 0, spot
    assert spot["worker_stopped_s"] is not None and spot["worker_exit_code"] == 0, spot
    assert spot["completed_after_notice_s"] <= 60.0, spot
    assert spot["stages_recomputed_beyond_interrupted"] == 0, spot
