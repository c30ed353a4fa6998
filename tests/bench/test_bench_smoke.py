"""The performance benches still run: the cheapest ones in a tiny mode, their JSON keys checked.

Each bench prints exactly one JSON line on stdout. The real figures come from running
them in full (bench/README.md); here they only have to run, on seconds of audio.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import REPO, SHARED

BENCHES = ["overhead", "stages", "long", "pipelining", "shim_load", "gpu", "peer", "stream"]


def run_bench(name: str, *args: str, timeout: float = 600) -> dict[str, Any]:
    """Run a bench; ``timeout`` bounds a hang only: loading the models alone takes minutes on a
    loaded 2-core machine."""
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"{name} must print one JSON line, printed: {proc.stdout[-2000:]}"
    out: dict[str, Any] = json.loads(lines[0])
    return out


@pytest.mark.parametrize("name", BENCHES)
def test_every_bench_documents_itself(name: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout


def test_gpu_bench_skips_cleanly_without_cuda() -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU is present: the GPU bench is a device run (minutes), not a smoke test")
    assert run_bench("gpu") == {"skipped": "no CUDA device"}


@pytest.mark.shared
def test_peer_tiny() -> None:
    if not (SHARED / "audio" / "conv_2spk_10min.wav").is_file():
        pytest.skip(f"../shared is absent ({SHARED}): the peer bench needs conv_2spk_10min.wav")
    from worker.cpu import AVX2_ONLY_ENV

    # --avx2: both sides (ours and WhisperX, each a process of its own) compute as an AVX2 CPU
    out = run_bench("peer", "--seconds", "5", "--rounds", "1", "--avx2", timeout=600)
    assert out["forced_env"] == AVX2_ONLY_ENV and out["onednn_max_cpu_isa"] == "AVX2"
    assert out["compute_type_auto"] == "int8_float32"  # no VNNI kernels below AVX-512
    assert out["audio_s"] == pytest.approx(5.0, abs=0.1)
    assert len(out["ours_total_s"]) == 1 and len(out["peer_wall_s"]) == 1
    assert out["ours_total_s"][0] > 0 and out["peer_wall_s"][0] > 0
    assert out["ratio"] == pytest.approx(out["ours_median_s"] / out["peer_median_s"], rel=0.01)
    assert set(out["cpu_flags"]) >= {"avx2", "avx512f", "avx512_vnni"} and out["cpu"]
    assert "loadavg_before" in out


@pytest.mark.shared
def test_stages_tiny() -> None:
    if not (SHARED / "audio" / "conv_2spk_10min.wav").is_file():
        pytest.skip(f"../shared is absent ({SHARED}): the stages bench needs conv_2spk_10min.wav")
    out = run_bench("stages", "--seconds", "3")
    assert set(out["stages"]) == {"ingest", "diarize", "transcribe", "align", "features", "merge"}
    assert {"seconds", "rtf", "cpu_s"} <= set(out["stages"]["diarize"])
    assert out["audio_s"] == pytest.approx(3.0, abs=0.1)
    assert out["total_s"] > 0 and "loadavg_before" in out
    assert 0 <= out["language_id_s"] <= out["stages"]["transcribe"]["seconds"]


def test_shim_load_tiny() -> None:
    if not shutil.which("wrk"):
        pytest.skip("wrk is absent (apt-get install -y wrk): the shim load bench drives the shim with it")
    out = run_bench("shim_load", "--seconds", "2", "--connections", "4")
    assert out["accepted_202"] > 0
    assert out["lost"] == 0, out
    for key in ("accepted_per_s", "latency_ms", "redis_job_records", "redis_chain_messages", "uvicorn_processes"):
        assert key in out
    assert {"p50", "p99"} <= set(out["latency_ms"])


def test_shim_load_paces_wrk_at_the_offered_rate() -> None:
    """--rate: wrk's delay() keeps each thread to its send schedule, one request per 1/rate s and
    never earlier, so the requests of a run are bounded by the schedule whatever the machine's
    speed: at most rate x duration, plus the first request of each thread. The rate is far below
    what the shim accepts unpaced (the run above), so a schedule that was ignored would show."""
    if not shutil.which("wrk"):
        pytest.skip("wrk is absent (apt-get install -y wrk): the shim load bench drives the shim with it")
    rate, threads = 20, 1  # threads: the bench's default
    out = run_bench("shim_load", "--seconds", "3", "--connections", "8", "--rate", str(rate))
    assert out["offered_rate"] == rate
    assert out["wrk"].startswith(f"-t{threads} ")
    # one request at most per slot, over wrk's own run time; slack: its threads start a moment
    # before its clock, the bench rounds the seconds, and a delay is rounded to the millisecond
    assert 0 < out["requests"] <= rate * (out["seconds"] + 0.1) + 2 * threads, out
    assert out["accepted_202"] > 0 and out["lost"] == 0, out


def test_stream_bench_scores_finals_as_turns(sample_wav: Any) -> None:
    """``bench.stream`` scores finals with the tests' definitions: finals that are the reference's
    own turns and words score WER 0 and DER 0 (whatever the labels are called); the two voices
    under one label score about the smaller voice's share of the speech."""
    from bench.stream import scores
    from tests.scoring import load_reference, load_rttm

    words = " ".join(t[3] for t in sorted(load_reference(sample_wav.with_suffix(".stm")), key=lambda t: t[1]))
    finals = [
        {"start": a, "end": b, "speaker": f"S-{who}", "text": ""}
        for who, a, b in load_rttm(sample_wav.with_suffix(".rttm"))
    ]
    finals[0]["text"] = words
    assert scores(finals, sample_wav, "en", 30.0) == {"wer": 0.0, "cer": None, "der": 0.0}
    one_voice = scores([{**f, "speaker": "one"} for f in finals], sample_wav, "en", 30.0)
    assert one_voice["wer"] == 0.0 and 0.2 < one_voice["der"] < 0.6
