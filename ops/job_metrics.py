"""Per-stage and per-job CloudWatch metrics from the workers, sent in batches.

Metrics (namespace ``ECG/AudioAnalysis``, dimension ``AutoScalingGroupName`` = the
worker group, plus ``Stage``):

=================  ========  ================================================================
``ProcessingTime``  Seconds   per stage (``Stage=transcribe`` …) and per job (``Stage=job``)
``ErrorRate``       Percent   100 for a failed stage or job, 0 for a good one: Average = error %
``MemoryUsage``     Percent   host memory in use at the end of a stage
``GPUUtilization``  Percent   mean NVML utilisation while a stage ran (only with pynvml + a GPU)
``GPUMemoryPeak``   Megabytes peak GPU memory in use while a stage ran (the job's peak = Maximum
                              over its stages)
=================  ========  ================================================================

Per instance, every ``gpu_report_interval_s`` (60 s), busy or idle, with the dimensions
``AutoScalingGroupName`` and ``InstanceId`` (one series per instance, which the
dashboard finds with a SEARCH expression):

=================  ========  ================================================================
``GPUUtilization``  Percent   mean of one-second NVML samples over the interval
``GPUMemoryUsed``   Megabytes peak GPU memory in use over the interval
=================  ========  ================================================================

Per image, with the dimensions ``AutoScalingGroupName`` and ``ImageVersion`` (the image tag
the worker runs, ``ECG_IMAGE_VERSION``), derived from the stage outcomes: the series a staged
deploy's rollback alarm compares (``DeployFailureAlarm`` in ``infra/worker-asg.yaml``):

=================  ========  ================================================================
``JobsCompleted``   Count     the last stage (merge) succeeded here
``JobsFailed``      Count     a stage failed here (a failed stage fails its job), any error code
``FleetFailures``   Count     of those, the ones that are the fleet's fault, not the input's
                              (``FLEET_FAULT_CODES``: internal errors, STAGE_CRASHED, GPU
                              memory, time limits)
``StageCrashes``    Count     of those, STAGE_CRASHED: a stage whose process died on every try
=================  ========  ================================================================

A failed stage also sends ``ErrorRate`` = 100 and a completed job 0 with ``Stage=job``, the
fleet's job error rate (``ErrorRateAlarm``).

``MemoryUsage``, ``GPUUtilization`` and ``GPUMemoryPeak`` are also sent with the group dimension alone:
CloudWatch does not aggregate across dimensions, and the alarms in
``infra/worker-asg.yaml`` watch that fleet-wide series. Job ids are never a
dimension: each distinct dimension set is a billed metric.

Nothing here imports Celery; ``worker/`` connects :meth:`JobMetrics.stage_started`
and :meth:`JobMetrics.stage_finished` to its signals.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog
from botocore.exceptions import BotoCoreError, ClientError

from ecg_audio.settings import Settings, get_settings
from ecg_audio.stage_table import STAGE_NAMES
from pipeline.errors import GPUMemoryError, ProcessingError, StageCrashedError, StageTimeoutError

log = structlog.get_logger(__name__)

MAX_DATA_PER_CALL = 1000  # PutMetricData limit on metric data per request
JOB_STAGE = "job"
UNKNOWN_IMAGE = "unknown"
STAGE_CRASHED = StageCrashedError.code
# Failures a new image can cause. The input's faults (DOWNLOAD_ERROR, INVALID_MEDIA,
# UNSUPPORTED_OPTION) are left out: a tenant sending bad files must not roll a deploy back.
FLEET_FAULT_CODES = frozenset({ProcessingError.code, STAGE_CRASHED, GPUMemoryError.code, StageTimeoutError.code})
_ERROR = 100.0
_OK = 0.0
LAST_STAGE = STAGE_NAMES[-1]


@dataclass(frozen=True)
class MetricDatum:
    name: str
    value: float
    unit: str
    dimensions: tuple[tuple[str, str], ...]
    timestamp: datetime

    def to_aws(self) -> dict[str, Any]:
        return {
            "MetricName": self.name,
            "Value": self.value,
            "Unit": self.unit,
            "Timestamp": self.timestamp,
            "Dimensions": [{"Name": k, "Value": v} for k, v in self.dimensions],
        }


class MetricBatcher:
    """Buffers metric data and sends them with as few ``PutMetricData`` calls as allowed.

    Thread-safe. A failed send is logged and its data dropped: metrics must never
    stop a job, and a buffer that grows while CloudWatch is unreachable would.
    """

    def __init__(
        self,
        cloudwatch: Any,
        namespace: str,
        *,
        flush_interval_s: float = 60.0,
        max_buffered: int = 20 * MAX_DATA_PER_CALL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cloudwatch = cloudwatch
        self.namespace = namespace
        self.flush_interval_s = flush_interval_s
        self._max_buffered = max_buffered
        self._clock = clock
        self._buffer: list[MetricDatum] = []
        self._lock = threading.Lock()
        self._last_flush = clock()

    def add(self, name: str, value: float, unit: str, dimensions: Mapping[str, str]) -> None:
        datum = MetricDatum(name, float(value), unit, tuple(sorted(dimensions.items())), datetime.now(UTC))
        with self._lock:
            if len(self._buffer) >= self._max_buffered:
                self._buffer.pop(0)  # oldest first: recent data matter more to alarms
            self._buffer.append(datum)

    def __len__(self) -> int:
        with self._lock:
            return len(self._buffer)

    def flush_if_due(self) -> int:
        """Flush when the interval has passed or a full request is waiting."""
        with self._lock:
            due = len(self._buffer) >= MAX_DATA_PER_CALL or self._clock() - self._last_flush >= self.flush_interval_s
        return self.flush() if due else 0

    def flush(self) -> int:
        """Send everything buffered; returns how many data were accepted."""
        with self._lock:
            pending, self._buffer = self._buffer, []
            self._last_flush = self._clock()
        sent = 0
        for start in range(0, len(pending), MAX_DATA_PER_CALL):
            chunk = pending[start : start + MAX_DATA_PER_CALL]
            try:
                self._cloudwatch.put_metric_data(Namespace=self.namespace, MetricData=[d.to_aws() for d in chunk])
            except (BotoCoreError, ClientError) as e:
                log.warning("metrics_put_failed", dropped=len(chunk), error=str(e))
                continue
            sent += len(chunk)
        return sent


class GpuProbe(Protocol):
    def utilization_percent(self) -> float: ...

    def memory_used_mib(self) -> float: ...


class NvmlGpuProbe:
    """Mean utilisation of the GPUs NVML shows this process."""

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self._nvml = nvml
        self._handles = handles

    @classmethod
    def create(cls) -> NvmlGpuProbe | None:
        """A probe when ``pynvml`` (package nvidia-ml-py) imports and a GPU exists, else None."""
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except pynvml.NVMLError as e:
            log.info("nvml_unavailable", error=str(e))
            return None
        return cls(pynvml, handles) if handles else None

    def utilization_percent(self) -> float:
        rates = [self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles]
        return float(sum(rates)) / len(rates)

    def memory_used_mib(self) -> float:
        """GPU memory in use on this instance's GPUs, all processes (the driver's view, not torch's)."""
        return float(sum(self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles)) / 2**20


@dataclass(frozen=True)
class GpuSummary:
    utilization_percent: float | None  # mean of the samples
    memory_peak_mib: float | None


class _UtilizationSampler:
    """Samples a probe on a daemon thread while a stage runs; ``stop()`` gives the mean and the peak."""

    def __init__(self, probe: GpuProbe, interval_s: float) -> None:
        self._probe = probe
        self._interval_s = interval_s
        self._samples: list[float] = []
        self._memory: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-utilization-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self._interval_s):
                return

    def sample(self) -> None:
        try:
            utilization, memory = self._probe.utilization_percent(), self._probe.memory_used_mib()
        except Exception as e:  # NVML errors vary by driver; a lost sample is harmless
            log.debug("gpu_sample_failed", error=str(e))
            return
        with self._lock:
            self._samples.append(utilization)
            self._memory.append(memory)

    def take(self) -> GpuSummary:
        """The summary so far, and start over (the per-instance reporter's interval)."""
        with self._lock:
            samples, memory, self._samples, self._memory = self._samples, self._memory, [], []
        return GpuSummary(sum(samples) / len(samples) if samples else None, max(memory) if memory else None)

    def stop(self) -> GpuSummary:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.take()


class InstanceGpuReporter:
    """Every ``interval_s``, this instance's GPU utilisation (mean) and memory (peak), busy or idle.

    The per-stage series only exist while stages run; these show an idle or stuck GPU too.
    """

    def __init__(
        self,
        batcher: MetricBatcher,
        probe: GpuProbe,
        group: str,
        instance_id: str,
        *,
        interval_s: float = 60.0,
        sample_interval_s: float = 1.0,
    ) -> None:
        self._batcher = batcher
        self._dimensions = {"AutoScalingGroupName": group, "InstanceId": instance_id}
        self._interval_s = interval_s
        self._sampler = _UtilizationSampler(probe, sample_interval_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-instance-reporter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.report()

    def report(self) -> None:
        summary = self._sampler.take()
        if summary.utilization_percent is not None:
            self._batcher.add("GPUUtilization", summary.utilization_percent, "Percent", self._dimensions)
        if summary.memory_peak_mib is not None:
            self._batcher.add("GPUMemoryUsed", summary.memory_peak_mib, "Megabytes", self._dimensions)
        # sent now, not at the stage metrics' pace: an idle worker sends nothing else
        self._batcher.flush()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sampler.stop()


def host_memory_percent(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    """Share of host memory in use (MemTotal − MemAvailable), or None where unreadable."""
    try:
        lines = [line.split() for line in meminfo.read_text().splitlines()]
        fields = {parts[0].rstrip(":"): int(parts[1]) for parts in lines if len(parts) >= 2}
        total, available = fields["MemTotal"], fields["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        return None
    return 100.0 * (total - available) / total if total else None


@dataclass
class _RunningStage:
    stage: str
    started: float
    sampler: _UtilizationSampler | None


class JobMetrics:
    """Records stage and job outcomes into a :class:`MetricBatcher`.

    Args:
        batcher: where data go.
        group: value of the ``AutoScalingGroupName`` dimension.
        gpu: utilisation probe; None skips ``GPUUtilization``.
        memory_percent: host memory probe; returns None to skip ``MemoryUsage``.
        gpu_sample_interval_s: how often the probe is read while a stage runs.
        image_version: value of the ``ImageVersion`` dimension of the per-image outcome counts.
    """

    def __init__(
        self,
        batcher: MetricBatcher,
        group: str,
        *,
        gpu: GpuProbe | None = None,
        memory_percent: Callable[[], float | None] = host_memory_percent,
        gpu_sample_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        image_version: str = UNKNOWN_IMAGE,
    ) -> None:
        self.batcher = batcher
        self.group = group
        self.image_version = image_version or UNKNOWN_IMAGE
        self._gpu = gpu
        self._memory_percent = memory_percent
        self._gpu_sample_interval_s = gpu_sample_interval_s
        self._clock = clock
        self._running: dict[str, _RunningStage] = {}
        self._lock = threading.Lock()
        self._instance_reporter: InstanceGpuReporter | None = None

    @property
    def has_gpu(self) -> bool:
        return self._gpu is not None

    # -- stage lifecycle, keyed by e.g. the Celery task id ----------------------------

    def stage_started(self, key: str, stage: str) -> None:
        sampler = _UtilizationSampler(self._gpu, self._gpu_sample_interval_s) if self._gpu else None
        with self._lock:
            self._running[key] = _RunningStage(stage, self._clock(), sampler)

    def stage_finished(self, key: str, *, ok: bool | None, error_code: str | None = None) -> None:
        """End the stage started under ``key``.

        Args:
            ok: True for success, False for failure, None when the stage will be
                retried (its time is recorded, its outcome is not yet known).
            error_code: the failure's error code (``AnalysisError.code``), when known.
        """
        with self._lock:
            running = self._running.pop(key, None)
        if running is None:
            return
        gpu = running.sampler.stop() if running.sampler else GpuSummary(None, None)
        self.record_stage(
            running.stage,
            self._clock() - running.started,
            ok=ok,
            gpu_utilization=gpu.utilization_percent,
            gpu_memory_peak_mib=gpu.memory_peak_mib,
            error_code=error_code,
        )

    @contextmanager
    def stage(self, stage: str) -> Iterator[None]:
        """Time a block as ``stage``; an exception counts as a failure and propagates."""
        key = f"{stage}:{threading.get_ident()}:{self._clock()}"
        self.stage_started(key, stage)
        try:
            yield
        except BaseException as e:
            self.stage_finished(key, ok=False, error_code=getattr(e, "code", None))
            raise
        self.stage_finished(key, ok=True)

    # -- direct recording ------------------------------------------------------------

    def record_stage(
        self,
        stage: str,
        duration_s: float,
        *,
        ok: bool | None,
        gpu_utilization: float | None = None,
        gpu_memory_peak_mib: float | None = None,
        error_code: str | None = None,
    ) -> None:
        per_stage = {"AutoScalingGroupName": self.group, "Stage": stage}
        fleet = {"AutoScalingGroupName": self.group}
        self.batcher.add("ProcessingTime", duration_s, "Seconds", per_stage)
        if ok is not None:
            self.batcher.add("ErrorRate", _OK if ok else _ERROR, "Percent", per_stage)
        memory = self._memory_percent()
        if memory is not None:
            self.batcher.add("MemoryUsage", memory, "Percent", per_stage)
            self.batcher.add("MemoryUsage", memory, "Percent", fleet)
        if gpu_utilization is not None:
            self.batcher.add("GPUUtilization", gpu_utilization, "Percent", per_stage)
            self.batcher.add("GPUUtilization", gpu_utilization, "Percent", fleet)
        if gpu_memory_peak_mib is not None:
            self.batcher.add("GPUMemoryPeak", gpu_memory_peak_mib, "Megabytes", per_stage)
            self.batcher.add("GPUMemoryPeak", gpu_memory_peak_mib, "Megabytes", fleet)
        if ok is False:
            self._record_outcome(ok=False, error_code=error_code)
        elif ok and stage == LAST_STAGE:
            self._record_outcome(ok=True, error_code=None)
        self.batcher.flush_if_due()

    def _record_outcome(self, *, ok: bool, error_code: str | None) -> None:
        """A job ended on this worker: the per-image counts and the job error rate.

        A failed stage always ends its job (retries finish with ``ok=None``, not False), and
        the last stage's success is the job's: so the outcome needs no job-level hook.
        """
        image = {"AutoScalingGroupName": self.group, "ImageVersion": self.image_version}
        job = {"AutoScalingGroupName": self.group, "Stage": JOB_STAGE}
        self.batcher.add("ErrorRate", _OK if ok else _ERROR, "Percent", job)
        if ok:
            self.batcher.add("JobsCompleted", 1, "Count", image)
            return
        self.batcher.add("JobsFailed", 1, "Count", image)
        # an error without a code is an exception the stage did not expect: the code's fault
        if error_code is None or error_code in FLEET_FAULT_CODES:
            self.batcher.add("FleetFailures", 1, "Count", image)
        if error_code == STAGE_CRASHED:
            self.batcher.add("StageCrashes", 1, "Count", image)

    def record_job_time(self, processing_time_s: float) -> None:
        """A job completed in this process: ``ProcessingTime`` with ``Stage=job`` (the sum of its stage
        times, as in its result). Its outcome is already counted from the last stage's success."""
        dimensions = {"AutoScalingGroupName": self.group, "Stage": JOB_STAGE}
        self.batcher.add("ProcessingTime", processing_time_s, "Seconds", dimensions)
        self.batcher.flush_if_due()

    def report_instance_gpu(self, instance_id: str, *, interval_s: float) -> None:
        """Also send this instance's GPU utilisation and memory every ``interval_s``."""
        if self._gpu is not None and self._instance_reporter is None:
            self._instance_reporter = InstanceGpuReporter(
                self.batcher, self._gpu, self.group, instance_id, interval_s=interval_s
            )

    def close(self) -> int:
        """Send what is buffered (call at worker shutdown)."""
        if self._instance_reporter is not None:
            self._instance_reporter.stop()
            self._instance_reporter = None
        return self.batcher.flush()


def job_metrics_from_settings(settings: Settings | None = None, cloudwatch: Any = None) -> JobMetrics | None:
    """The worker's recorder, or None when ``ECG_JOB_METRICS_ENABLED`` is false."""
    settings = settings or get_settings()
    if not settings.job_metrics_enabled:
        return None
    if cloudwatch is None:
        from ops import aws

        cloudwatch = aws.client("cloudwatch", settings)
    batcher = MetricBatcher(cloudwatch, settings.metrics_namespace, flush_interval_s=settings.metrics_interval_s)
    metrics = JobMetrics(
        batcher,
        settings.worker_asg_name or "local",
        gpu=NvmlGpuProbe.create(),
        image_version=settings.image_version or UNKNOWN_IMAGE,
    )
    if metrics.has_gpu:
        from ops import aws

        instance_id = aws.instance_id(settings)
        if instance_id:
            metrics.report_instance_gpu(instance_id, interval_s=settings.gpu_report_interval_s)
        else:
            log.info("instance_gpu_metrics_disabled", reason="no instance id (ECG_INSTANCE_ID or IMDSv2)")
    return metrics
