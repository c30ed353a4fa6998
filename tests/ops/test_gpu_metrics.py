"""GPU metrics through the real NVML code path, with a fake ``pynvml`` where no GPU exists.

The fake is the module ``nvidia-ml-py`` installs (``pynvml``), reduced to the calls
:class:`ops.job_metrics.NvmlGpuProbe` makes, with two GPUs whose readings the
test sets. Everything after it is real: the probe, the samplers, the batcher, and
CloudWatch (moto).
"""

from __future__ import annotations

import datetime as dt
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ecg_audio.settings import Settings
from ops import aws
from ops.job_metrics import NvmlGpuProbe, job_metrics_from_settings
from tests.helpers import wait_for

NAMESPACE = "ECG/AudioAnalysis"
MIB = 2**20


@dataclass
class _Utilization:
    gpu: int
    memory: int


@dataclass
class _Memory:
    total: int
    free: int
    used: int


class _FakeNvml(types.ModuleType):
    """Two GPUs; ``busy`` and ``used_mib`` are what NVML would read now."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.busy = [70, 90]
        self.used_mib = [3000, 5000]
        self.initialised = False

    def nvmlInit(self) -> None:  # noqa: N802
        self.initialised = True

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        assert self.initialised, "NVML must be initialised first"
        return index

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> _Utilization:  # noqa: N802
        return _Utilization(self.busy[handle], 0)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _Memory:  # noqa: N802
        used = self.used_mib[handle] * MIB
        return _Memory(24 * 1024 * MIB, 24 * 1024 * MIB - used, used)


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[_FakeNvml]:
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    yield fake


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
    return points[0] if points else {}


def test_probe_reads_every_gpu(nvml: _FakeNvml) -> None:
    probe = NvmlGpuProbe.create()
    assert probe is not None
    assert probe.utilization_percent() == 80.0
    assert probe.memory_used_mib() == 8000.0


def test_gpu_utilisation_and_memory_reach_cloudwatch(nvml: _FakeNvml, settings: Settings) -> None:
    settings = settings.model_copy(
        update={"job_metrics_enabled": True, "instance_id": "i-0gpu", "gpu_report_interval_s": 1.0}
    )
    metrics = job_metrics_from_settings(settings)
    assert metrics is not None and metrics.has_gpu
    group = {"AutoScalingGroupName": settings.worker_asg_name or ""}
    instance = {**group, "InstanceId": "i-0gpu"}

    # per instance, every interval, without any stage running
    wait_for(lambda: _stats(settings, "GPUMemoryUsed", instance), interval=0.2, what="GPUMemoryUsed in CloudWatch")
    assert _stats(settings, "GPUUtilization", instance)["Average"] == 80.0
    assert _stats(settings, "GPUMemoryUsed", instance)["Maximum"] == 8000.0

    # per stage: the peak while it ran, not the reading at its end
    metrics.stage_started("task-1", "transcribe")
    nvml.used_mib = [9000, 9000]
    wait_for(lambda: _sampled(metrics, 18000.0), what="the stage's sampler reading the peak")
    nvml.used_mib = [1000, 1000]
    wait_for(lambda: _sampled(metrics, 2000.0), what="one more sample, with the lower reading")
    metrics.stage_finished("task-1", ok=True)
    metrics.close()
    assert _stats(settings, "GPUMemoryPeak", {**group, "Stage": "transcribe"})["Maximum"] == 18000.0
    assert _stats(settings, "GPUUtilization", {**group, "Stage": "transcribe"})["Average"] == 80.0


def _sampled(metrics: object, memory_mib: float) -> bool:
    """Whether the sampler of the running stage ``task-1`` has read ``memory_mib`` (all GPUs)."""
    running = getattr(metrics, "_running", {}).get("task-1")
    sampler = getattr(running, "sampler", None)
    return sampler is not None and memory_mib in getattr(sampler, "_memory", [])
