"""The shortened chaos bench: real workers killed, Redis restarted, receiver down, OOM injected;
and the delivery scenarios of issue 17 (slow receiver, crash before the final, poison message,
restart in place, Redis blip, cancel during merge)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.acceptance, pytest.mark.timeout(1800)]


def _chaos(scenarios: str, timeout: float, bench: str = "bench.chaos") -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", bench, "--quick", "--scenarios", scenarios],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    print("chaos:", json.dumps(out))
    return out


def test_chaos_quick() -> None:
    out = _chaos("kill,redis,receiver,sigterm,many,oom,spot", 1500)
    kill = out["kill"]
    assert kill["completed"] == kill["jobs"] and kill["lost"] == 0 and kill["failed"] == 0, kill
    assert kill["results_equal"] == kill["jobs"] and kill["one_final_callback"] == kill["jobs"], kill
    assert kill["stages_recomputed"] == 0, kill
    assert kill["restored_from_dead_workers"] > 0, kill  # the dead-worker restore path ran
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


def test_chaos_delivery_quick() -> None:
    out = _chaos(
        "slow_receiver,crash_before_final,poison,restart_in_place,redis_blip,cancel_during_merge",
        1750,
        bench="bench.chaos_delivery",
    )
    slow = out["slow_receiver"]
    assert slow["delivered"] == slow["events"] and slow["lost"] == 0 and slow["duplicates"] == 0, slow
    assert slow["out_of_order_jobs"] == 0 and slow["final_duplicates"] == 0, slow
    crash = out["crash_before_final"]
    assert crash["completed"] == crash["jobs"] == crash["crashes_injected"], crash
    assert crash["one_final_each"] == crash["jobs"] == crash["finals_say_completed"], crash
    poison = out["poison"]
    assert poison["poison_status"] == "failed" and poison["error_code"] == "STAGE_CRASHED", poison
    assert poison["deliveries_killed"] == 3 and poison["final_sent"] == 1 and poison["dead_letter_listed"] == 1, poison
    assert poison["next_job_completed"] == 1 and poison["worker_alive"] == 1, poison
    rip = out["restart_in_place"]
    assert rip["restored"] >= 1 and rip["seconds_to_restore"] <= 60 and rip["completed"] == 1, rip
    blip = out["redis_blip"]
    assert blip["completed"] == blip["jobs"] and blip["stalled_over_60s"] == 0, blip
    cancel = out["cancel_during_merge"]
    assert cancel["cancelled_in_merge"] == 1 and cancel["finals"] == 1 and cancel["agree"] == 1, cancel
    assert cancel["record"] == "failed/CANCELLED", cancel


def test_chaos_redis_outage_long_quick() -> None:
    """Redis away past the liveness window and the lease TTL while two workers run stages (issue 23):
    restored copies run beside the originals; the lease-checked publish and the restored copies' own
    delivery tags keep every job to one completion, each stage's successor to one publish."""
    out = _chaos("redis_outage_long", 1750)
    long = out["redis_outage_long"]
    assert long["completed"] == long["jobs"] == long["one_final_each"], long
    assert long["duplicate_publishes"] == 0 and long["stuck"] == 0, long
    assert long["stages_published"] == 5 * long["jobs"], long  # ingest..features each published its successor
    assert long["restored_from_dead_workers"] >= 1, long  # a live worker's message was restored: two copies ran
