"""The compute type and thread counts chosen from the CPU (worker/cpu.py), on fake CPUs."""

from __future__ import annotations

import os

import pytest

from worker.cpu import cpu_compute_type, cpu_flags, cpu_model_name, cpu_threads, effective_flags

ZEN4 = "fpu sse sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16".split()
SKYLAKE_SP = "fpu sse sse2 avx avx2 fma avx512f avx512bw avx512vl avx512dq".split()
ZEN3 = "fpu sse sse2 avx avx2 fma f16c".split()
ALDER_LAKE = "fpu sse sse2 avx avx2 fma avx_vnni".split()
SANDY_BRIDGE = "fpu sse sse2 sse4_2 avx".split()
GRAVITON = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp".split()

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse avx avx2 fma

processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse avx avx2 fma
"""


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (ZEN4, "int8"),  # VNNI: the measured default stays
        (ALDER_LAKE, "int8"),  # AVX-VNNI (256-bit) has the same one-instruction dot product
        (SKYLAKE_SP, "int8_float32"),
        (ZEN3, "int8_float32"),
        (SANDY_BRIDGE, "float32"),
        ([], "float32"),
        (GRAVITON, "int8"),
    ],
)
def test_compute_type_from_flags(flags: list[str], expected: str) -> None:
    assert cpu_compute_type(flags) == expected


def test_onednn_cap_turns_an_avx512_machine_into_an_avx2_one() -> None:
    capped = effective_flags(ZEN4, "AVX2")
    assert "avx512_vnni" not in capped and "avx512f" not in capped and {"avx2", "fpu"} <= capped
    assert cpu_compute_type(capped) == "int8_float32"
    assert cpu_compute_type(effective_flags(ZEN4, "avx512_core")) == "int8_float32"  # no VNNI at that level
    assert effective_flags(ZEN4, "AVX512_CORE_VNNI") == frozenset(ZEN4)  # at or above VNNI: nothing removed
    assert effective_flags(ZEN4, None) == frozenset(ZEN4)


def test_flags_and_model_name_from_cpuinfo() -> None:
    assert cpu_flags(CPUINFO) == frozenset({"fpu", "sse", "avx", "avx2", "fma"})
    assert cpu_model_name(CPUINFO) == "AMD EPYC 7B13"
    assert cpu_flags("") == frozenset() and cpu_model_name("") == "unknown"


def test_threads_follow_the_affinity_mask_unless_set() -> None:
    assert cpu_threads(3) == 3
    assert cpu_threads(0) == len(os.sched_getaffinity(0))
