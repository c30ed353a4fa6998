"""bench/capacity.py: a short simulation whose numbers must move the way scaling does."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_capacity_simulation_trades_wait_for_instance_hours() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.capacity", "--hours", "12", "--seeds", "1", "--targets", "1,8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for pattern in ("steady", "bursty", "daynight"):
        low, high = out["results"][pattern]["1"], out["results"][pattern]["8"]
        assert low["unfinished"] == high["unfinished"] == 0
        # a higher target: fewer instance-hours and cheaper audio hours, longer waits
        assert high["instance_hours"] < low["instance_hours"], pattern
        assert high["cost_usd_per_audio_hour"] < low["cost_usd_per_audio_hour"], pattern
        assert high["p95_wait_s"] > low["p95_wait_s"], pattern
    assert out["chosen_target"] in (1.0, 8.0, None)
