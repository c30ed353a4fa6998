from __future__ import annotations

import datetime as dt
import json

import pytest

from ecg_audio.settings import Settings
from ops import aws
from ops.job_metrics import (
    MAX_DATA_PER_CALL,
    JobMetrics,
    MetricBatcher,
    NvmlGpuProbe,
    host_memory_percent,
    job_metrics_from_settings,
)

NAMESPACE = "ECG/AudioAnalysis"


class _FixedGpu:
    """The GPU is the edge of the world here: a probe that always reads 42 % and 1234 MiB."""

    def utilization_percent(self) -> float:
        return 42.0

    def memory_used_mib(self) -> float:
        return 1234.0


def _count_put_calls(cloudwatch) -> list[int]:
    calls: list[int] = []
    cloudwatch.meta.events.register(
        "before-parameter-build.cloudwatch.PutMetricData", lambda params, **_: calls.append(len(params["MetricData"]))
    )
    return calls


def _stats(settings: Settings, name: str, dimensions: dict[str, str]) -> dict[str, float]:
    now = dt.datetime.now(dt.UTC)
    points = aws.client("cloudwatch", settings).get_metric_statistics(
        Namespace=NAMESPACE,
        MetricName=name,
        Dimensions=[{"Name": k, "Value": v} for k, v in dimensions.items()],
        StartTime=now - dt.timedelta(minutes=5),
        EndTime=now + dt.timedelta(minutes=5),
        Period=600,
        Statistics=["SampleCount", "Average", "Maximum"],
    )["Datapoints"]
    assert len(points) <= 1
    return points[0] if points else {}


def test_batches_at_most_1000_per_call(settings: Settings) -> None:
    cloudwatch = aws.client("cloudwatch", settings)
    calls = _count_put_calls(cloudwatch)
    batcher = MetricBatcher(cloudwatch, NAMESPACE)
    for i in range(2 * MAX_DATA_PER_CALL + 500):
        batcher.add("ProcessingTime", i % 10, "Seconds", {"AutoScalingGroupName": "g", "Stage": "transcribe"})

    assert batcher.flush() == 2500

    assert calls == [1000, 1000, 500]
    assert (
        _stats(settings, "ProcessingTime", {"AutoScalingGroupName": "g", "Stage": "transcribe"})["SampleCount"] == 2500
    )


def test_flush_if_due_waits_for_the_interval(settings: Settings) -> None:
    now = [0.0]
    batcher = MetricBatcher(aws.client("cloudwatch", settings), NAMESPACE, flush_interval_s=60, clock=lambda: now[0])
    batcher.add("ErrorRate", 0, "Percent", {"AutoScalingGroupName": "g"})

    assert batcher.flush_if_due() == 0
    now[0] = 61.0
    assert batcher.flush_if_due() == 1
    assert len(batcher) == 0


def test_stage_and_job_metrics_reach_cloudwatch(settings: Settings) -> None:
    batcher = MetricBatcher(aws.client("cloudwatch", settings), NAMESPACE, flush_interval_s=3600)
    metrics = JobMetrics(
        batcher, "ecg-workers-test", gpu=_FixedGpu(), memory_percent=lambda: 55.0, gpu_sample_interval_s=0.01
    )

    metrics.stage_started("task-1", "transcribe")
    metrics.stage_finished("task-1", ok=True)
    with pytest.raises(ValueError), metrics.stage("diarize"):
        raise ValueError("bad audio")
    metrics.stage_started("task-3", "align")
    metrics.stage_finished("task-3", ok=None)  # will be retried: no error-rate sample yet
    metrics.record_job_time(45.0)
    metrics.record_job_time(50.0)
    # 3 stages x (time, memory x2, GPU x2, GPU memory x2) + 2 stage outcomes + 2 job times
    # + the failed diarize's job outcome (ErrorRate job, JobsFailed, FleetFailures)
    assert metrics.close() == 28

    group = {"AutoScalingGroupName": "ecg-workers-test"}
    assert _stats(settings, "ErrorRate", {**group, "Stage": "transcribe"})["Average"] == 0.0
    assert _stats(settings, "ErrorRate", {**group, "Stage": "diarize"})["Average"] == 100.0
    assert _stats(settings, "ErrorRate", {**group, "Stage": "align"}) == {}
    assert _stats(settings, "ProcessingTime", {**group, "Stage": "align"})["SampleCount"] == 1
    # the failed stage's job (100): a job's time says nothing of its outcome
    assert _stats(settings, "ErrorRate", {**group, "Stage": "job"})["Average"] == 100.0
    assert _stats(settings, "ProcessingTime", {**group, "Stage": "job"})["Maximum"] == 50.0
    gpu = _stats(settings, "GPUUtilization", {**group, "Stage": "transcribe"})
    assert (gpu["SampleCount"], gpu["Average"]) == (1.0, 42.0)
    assert _stats(settings, "GPUMemoryPeak", {**group, "Stage": "transcribe"})["Maximum"] == 1234.0
    # The fleet-wide series the alarms watch carry the group dimension alone. (moto's
    # statistics match dimensions as a subset, CloudWatch matches them exactly, so
    # check the dimension sets rather than the fleet statistics.)
    listed = aws.client("cloudwatch", settings).list_metrics(Namespace=NAMESPACE)["Metrics"]
    dimension_sets = {(m["MetricName"], tuple(d["Name"] for d in m["Dimensions"])) for m in listed}
    for name in ("MemoryUsage", "GPUUtilization", "GPUMemoryPeak"):
        assert (name, ("AutoScalingGroupName",)) in dimension_sets
    for name in ("ErrorRate", "ProcessingTime"):
        assert (name, ("AutoScalingGroupName",)) not in dimension_sets


def test_without_nvml_or_gpu_there_is_no_probe() -> None:
    try:
        import pynvml  # noqa: F401
    except ImportError:
        assert NvmlGpuProbe.create() is None
        return
    probe = NvmlGpuProbe.create()
    if probe is not None:  # a GPU machine: the reading must be a percentage
        assert 0.0 <= probe.utilization_percent() <= 100.0


def test_host_memory_percent_reads_proc_meminfo(tmp_path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    250 kB\n")

    assert host_memory_percent(meminfo) == 75.0
    assert host_memory_percent(tmp_path / "absent") is None


def test_disabled_by_default(settings: Settings) -> None:
    assert job_metrics_from_settings(settings) is None
    assert job_metrics_from_settings(settings.model_copy(update={"job_metrics_enabled": True})) is not None


def test_job_outcomes_per_image_come_from_the_stage_outcomes(settings: Settings) -> None:
    """What a staged deploy's DeployFailureAlarm compares: jobs that ended on one image, and why."""
    from ecg_audio.stage_table import STAGE_NAMES
    from pipeline.errors import DownloadError, ProcessingError

    batcher = MetricBatcher(aws.client("cloudwatch", settings), NAMESPACE, flush_interval_s=3600)
    metrics = JobMetrics(batcher, "ecg-workers-test", memory_percent=lambda: None, image_version="sha-new")

    for stage in STAGE_NAMES:  # a whole job; only the last stage's success completes it
        metrics.stage_started(f"job1-{stage}", stage)
        metrics.stage_finished(f"job1-{stage}", ok=True)
    metrics.stage_started("job2-ingest", "ingest")
    metrics.stage_finished("job2-ingest", ok=None)  # a network retry: not an outcome
    with pytest.raises(DownloadError), metrics.stage("ingest"):  # the input's fault
        raise DownloadError("404", retryable=False)
    with pytest.raises(ProcessingError), metrics.stage("diarize"):  # the worker gave up on a dying stage
        raise ProcessingError("the diarize stage was started 3 times", code="STAGE_CRASHED")
    metrics.stage_started("job5-transcribe", "transcribe")
    metrics.stage_finished("job5-transcribe", ok=False, error_code="GPU_MEMORY_ERROR")
    metrics.close()

    image = {"AutoScalingGroupName": "ecg-workers-test", "ImageVersion": "sha-new"}
    assert _stats(settings, "JobsCompleted", image)["SampleCount"] == 1
    assert _stats(settings, "JobsFailed", image)["SampleCount"] == 3
    assert _stats(settings, "FleetFailures", image)["SampleCount"] == 2  # not the download error
    assert _stats(settings, "StageCrashes", image)["SampleCount"] == 1
    assert _stats(settings, "ErrorRate", {"AutoScalingGroupName": "ecg-workers-test", "Stage": "job"})[
        "Average"
    ] == pytest.approx(75.0)


def test_the_image_version_comes_from_the_settings(settings: Settings) -> None:
    enabled = settings.model_copy(update={"job_metrics_enabled": True})
    untagged = job_metrics_from_settings(enabled)
    assert untagged is not None and untagged.image_version == "unknown"
    tagged = job_metrics_from_settings(enabled.model_copy(update={"image_version": "3f2c1ab"}))
    assert tagged is not None and tagged.image_version == "3f2c1ab"


_SIGNAL_SCRIPT = """
import json
from celery import signals
from pipeline.errors import StageCrashedError
import worker.app as app
from worker import boot
from ops.job_metrics import JobMetrics

class Recorder:
    def __init__(self):
        self.sent = []
    def add(self, name, value, unit, dimensions):
        self.sent.append([name, dimensions.get("ImageVersion"), dimensions.get("Stage")])
    def flush_if_due(self):
        return 0

recorder = Recorder()
task = app.app.tasks["ecg.diarize"]  # configures the app: worker.boot connects its signals
boot._state["metrics"] = JobMetrics(recorder, "g", memory_percent=lambda: None, image_version="sha-new")
signals.task_prerun.send(sender=task, task_id="t1", task=task)
crash = StageCrashedError("the diarize stage was started 3 times")
signals.task_postrun.send(sender=task, task_id="t1", task=task, state="FAILURE", retval=crash)
print(json.dumps(recorder.sent))
"""


def test_the_worker_signals_carry_the_error_code(tmp_path) -> None:
    """Through Celery's own signals, as a worker process sends them: a STAGE_CRASHED stage is counted
    as a crash of this image (a subprocess: importing worker.app sets process-wide state)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ECG_SECRETS_MANAGER_SECRET_ID": "", "ECG_WORKSPACE_ROOT": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", _SIGNAL_SCRIPT], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sent = json.loads(result.stdout.strip().splitlines()[-1])
    assert ["StageCrashes", "sha-new", None] in sent
    assert ["FleetFailures", "sha-new", None] in sent
    assert ["ErrorRate", None, "diarize"] in sent
