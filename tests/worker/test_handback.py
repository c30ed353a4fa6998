"""A spot or lifecycle drain hands a running stage back (worker/interruption.py kills its pool child and
Celery requeues the message): that delivery is not a crash. Three hand-backs of the same stage must not
fail the job with STAGE_CRASHED, while three deliveries whose process died still do
(tests/test_final_event.py, test_a_stage_that_kills_its_process_ends_after_n_deliveries).

Real stage task code in forked processes (as pool children run it), real Redis, real SIGKILL; the
parent's hand-back bookkeeping is the function the drain calls after the kill."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from ecg_audio.settings import get_settings
from tests.helpers import Forked, wait_for


class NoModels:
    device = "cpu"


@pytest.fixture
def env(stage_redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    redis_url = stage_redis_url
    from tasks import context

    monkeypatch.setenv("ECG_REDIS_URL", redis_url)
    monkeypatch.setenv("ECG_WORKSPACE_ROOT", str(tmp_path / "ws"))
    monkeypatch.setenv("ECG_OUTPUT_ROOT", str(tmp_path / "out"))
    # each delivery stops inside the stage (after it counted itself and took the lease) for the drain
    monkeypatch.setenv("ECG_FAULT_INJECTION", "pause:diarize:600")
    get_settings.cache_clear()
    context.job_store.cache_clear()
    context.set_model_provider(lambda: NoModels())  # type: ignore[arg-type, return-value]
    yield redis.Redis.from_url(redis_url, decode_responses=True)
    get_settings.cache_clear()
    context.job_store.cache_clear()


def _child(job: str) -> None:
    from tasks import context
    from tasks.pipeline_tasks import StageTask

    get_settings.cache_clear()
    context.job_store.cache_clear()
    task = StageTask()
    task.name = "ecg.diarize"
    task.run_stage_task("diarize", {"job_id": job})


def test_three_hand_backs_do_not_fail_the_job(env: redis.Redis) -> None:
    from tasks import context
    from tasks.pipeline_tasks import STAGE_TASKS
    from worker.interruption import _handed_back

    job = f"hb-{uuid.uuid4().hex[:8]}"
    store = context.job_store()
    assert store.create(job, {"job_id": job, "video_url": "https://example.com/a.wav"})
    store.update(job, status="processing", progress=30, stage="diarize", message="Finding speakers")
    request = SimpleNamespace(args=[{"job_id": job}], name="ecg.diarize")
    for n in range(1, 4):
        child = Forked(_child, job).start()
        # running: counted as a delivery, holding the lease, paused inside the stage
        wait_for(lambda: env.hget(f"ecg:job:{job}", "deliveries:diarize") == "1", 120, what=f"delivery {n} counted")
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)  # what the drain's hand_back does
        assert child.join(30) == -signal.SIGKILL
        _handed_back(get_settings(), request)
        assert env.hget(f"ecg:job:{job}", "deliveries:diarize") == "0", n
        assert not env.exists(f"ecg:lease:{job}:diarize")  # the next delivery runs at once
    rec = store.get(job)
    assert rec is not None and rec.status == "processing", rec
    # the fourth delivery runs the stage (found done here: its checkpoint) instead of failing the job
    ws = Path(get_settings().workspace_root) / job
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "diarization.json").write_text("{}")
    os.environ["ECG_FAULT_INJECTION"] = ""
    get_settings.cache_clear()
    assert STAGE_TASKS["diarize"].run_stage_task("diarize", {"job_id": job}) == {"job_id": job}
    rec = store.get(job)
    assert rec is not None and rec.status == "processing" and rec.error_code is None, rec
