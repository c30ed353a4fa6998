"""Chaos ``slowloris_tenant`` (quick): tenant A's receiver trickles a byte every 5 s; tenant B's events
all arrive, in order, none twice, p99 delay within 2 s, with the default delivery settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_slowloris_tenant_quick() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.chaos_delivery", "--quick", "--scenarios", "slowloris_tenant"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=850,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])["slowloris_tenant"]
    print("slowloris_tenant:", json.dumps(out))
    assert out["b_delivered"] == out["b_events"] and out["b_lost"] == 0 and out["b_duplicates"] == 0, out
    assert out["b_out_of_order_jobs"] == 0, out
    # the acceptance figure (p99 <= 2 s) is the bench's to report; here, on whatever load CI has, B is
    # not stalled behind A: a stalled event would wait for A's trickling POSTs (minutes)
    assert out["b_p99_delay_s"] <= 20.0, out
    # A's events are kept for the schedule's next attempts, not dropped
    assert out["a_events_waiting"] + out["a_events_dead"] == out["b_events"], out
