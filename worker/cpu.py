"""The CPU as the models see it: the cores this process may use, the instruction sets it has,
and the thread counts and CTranslate2 compute type that follow from them.

One place decides the thread counts of every model library in a process (torch's intra-op
pool, which the ONNX Runtime sessions of the diarization copy, and CTranslate2's
``cpu_threads``), so a Celery worker's child and an in-process run (``ecg-audio analyze``,
``bench.stages``) compute with the same number of threads. Left to themselves they differ:
CTranslate2 was given ``os.cpu_count()`` (the machine's CPUs, not the ones this process may
run on), and OpenMP/MKL read ``OMP_NUM_THREADS`` from whatever environment started the process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CPUINFO = Path("/proc/cpuinfo")

# oneDNN's names for the instruction-set caps of ONEDNN_MAX_CPU_ISA, and the /proc/cpuinfo flags
# each cap still allows (the cap is how an AVX-512 machine is made to run as an AVX2 one)
_ISA_CAPS: dict[str, frozenset[str]] = {
    "SSE41": frozenset(),
    "AVX": frozenset({"avx"}),
    "AVX2": frozenset({"avx", "avx2", "fma"}),
    "AVX2_VNNI": frozenset({"avx", "avx2", "fma", "avx_vnni"}),
    "AVX512_CORE": frozenset({"avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}),
}


# What makes an AVX-512 machine compute as an AVX2-only one (an AMD Zen 3, a common cloud CPU),
# for the libraries that can be told: oneDNN's cap; CTranslate2 off MKL (on an Intel CPU it runs
# its GEMMs in MKL, which ONEDNN_MAX_CPU_ISA does not cap; on AMD it runs oneDNN anyway); MKL's
# own cap (torch's float GEMMs); torch's own kernels. ONNX Runtime (the diarization) has no such
# switch and keeps the machine's kernels.
AVX2_ONLY_ENV = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "CT2_USE_MKL": "0",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
}

# environment variables that change how many threads, or which kernels, the libraries use
_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "ONEDNN_MAX_CPU_ISA",
    "CT2_USE_MKL",
    "MKL_ENABLE_INSTRUCTIONS",
    "ATEN_CPU_CAPABILITY",
)


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask: a container's or taskset's limit)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def cpu_threads(setting: int = 0) -> int:
    """Threads per model library: ``setting`` (ECG_CPU_THREADS) when > 0, else every core this
    process may use (one job at a time per worker process: nothing else computes beside it)."""
    return setting if setting > 0 else available_cores()


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The first processor's flags from /proc/cpuinfo (empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_model_name(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(errors="replace")
        except OSError:
            return "unknown"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return "unknown"


def effective_flags(flags: Iterable[str], max_isa: str | None = None) -> frozenset[str]:
    """``flags`` as the int8 kernels will use them: without the vector extensions that
    ONEDNN_MAX_CPU_ISA caps away (the other flags are kept)."""
    flags = frozenset(flags)
    allowed = _ISA_CAPS.get((max_isa or "").strip().upper())
    if allowed is None:  # no cap, or one at or above AVX-512 VNNI: the machine's own flags
        return flags
    vector = {f for f in flags if f.startswith("avx") or f == "fma"}
    return (flags - vector) | (vector & allowed)


def cpu_compute_type(flags: Iterable[str]) -> str:
    """The CTranslate2 compute type that is fastest on a CPU with these flags.

    CTranslate2 quantizes only the linear layers' weights with ``int8``; the other weights stay
    in the saved model's precision unless a float type is named, and on a CPU (no efficient
    float16) they run as float32, so ``int8`` and ``int8_float32`` run the same kernels there.
    What differs between CPUs is whether the int8 kernels are fast:
    - AVX-512 VNNI (or AVX-VNNI): one instruction per 4-way u8*s8 dot product: ``int8``, the
      measured default.
    - AVX-512BW or AVX2 without VNNI: the int8 GEMM takes three instructions per dot product and
      still moves a quarter of float32's bytes: ``int8_float32`` (named, so a model saved in
      float16 or float32 runs the same way on every such machine).
    - no AVX2: the int8 kernels fall back to generic code, slower than float32's: ``float32``.
    """
    flags = frozenset(flags)
    if flags & {"avx512_vnni", "avx_vnni", "avx512vnni"}:
        return "int8"
    if flags & {"avx512bw", "avx2"}:
        return "int8_float32"
    if "asimd" in flags:  # ARM64 NEON: CTranslate2's int8 runs on Ruy there
        return "int8"
    return "float32"


def auto_compute_type(device: str) -> str:
    """``ECG_COMPUTE_TYPE=auto``: float16 on CUDA; on a CPU, from its flags at start."""
    if device == "cuda":
        return "float16"
    return cpu_compute_type(effective_flags(cpu_flags(), os.environ.get("ONEDNN_MAX_CPU_ISA")))


def configure_torch_threads(threads: int) -> None:
    """torch's intra-op pool (and so the ONNX Runtime sessions, which copy it) to ``threads``."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def thread_report() -> dict[str, Any]:
    """What this process computes with: ops and tests compare a worker's child with an
    in-process run (``ecg.worker_info``)."""
    import torch

    try:
        status = Path("/proc/self/status").read_text().splitlines()
        os_threads: int | None = int(next(line.split()[1] for line in status if line.startswith("Threads:")))
    except (OSError, StopIteration, ValueError):
        os_threads = None
    return {
        "cores_available": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python_threads": threading.active_count(),
        "os_threads": os_threads,
        "env": {k: os.environ[k] for k in _THREAD_ENV if k in os.environ},
        "allocator": "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system",
    }
