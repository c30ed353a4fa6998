"""A CUDA out-of-memory error in diarize or align gets transcribe's treatment: half the batch, then
the CPU, each step in metadata.notes (via the workspace's notes.json), instead of a generic
PROCESSING_ERROR. Fault injection (ECG_FAULT_INJECTION=cuda_oom:<stage>:<n>) raises the errors;
the model calls are fakes that record what they were run with (no GPU here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import pipeline.align
import pipeline.diarize
from pipeline.errors import GPUMemoryError
from tasks.stage_env import StageEnv
from tasks.stages import JobSpec, _stage_notes, run_stage


class FakeDiarization:
    def __init__(self) -> None:
        self.embedding_batch_size = 32
        self.segmentation_batch_size = 32
        self.moves: list[str] = []

    def to(self, device: Any) -> FakeDiarization:
        self.moves.append(str(device))
        return self


class FakeResult:
    def to_dict(self) -> dict[str, Any]:
        return {"turns": []}


class Models:
    def __init__(self, device: str) -> None:
        self.device = device
        self.pipe = FakeDiarization()

    def diarization(self) -> tuple[Any, str]:
        return self.pipe, "fake"

    def aligner(self, language: str) -> None:
        return None

    def asr(self, language: str | None = None, *, device: str | None = None) -> tuple[Any, str]:
        return object(), "fake-asr"


def _env(tmp_path: Path, models: Models, faults: str) -> StageEnv:
    return StageEnv(
        workspace_root=tmp_path / "ws", output_root=tmp_path / "out", models=models,  # type: ignore[arg-type]
        report=lambda *a: None, fault_injection=faults,
    )


def test_diarize_oom_halves_the_batch_and_notes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = Models("cpu")
    used: list[tuple[int, int]] = []

    def fake_diarize_wav(pipe: FakeDiarization, *a: Any, **k: Any) -> FakeResult:
        used.append((pipe.embedding_batch_size, pipe.segmentation_batch_size))
        return FakeResult()

    monkeypatch.setattr(pipeline.diarize, "diarize_wav", fake_diarize_wav)
    env = _env(tmp_path, models, "cuda_oom:diarize:2")
    job = JobSpec(job_id="oom-d", source="x")
    run_stage("diarize", job, env)
    ws = env.workspace(job.job_id)
    assert ws.has("diarization.json")
    assert used == [(8, 8)]  # 32 -> 16 -> 8
    assert (models.pipe.embedding_batch_size, models.pipe.segmentation_batch_size) == (32, 32)  # restored
    notes = _stage_notes(ws)
    assert notes == [
        "diarization: out of GPU memory at batch size 32; retried with 16",
        "diarization: out of GPU memory at batch size 16; retried with 8",
    ]


def test_diarize_oom_at_batch_one_falls_back_to_cpu_and_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = Models("cuda")
    models.pipe.embedding_batch_size = 1
    monkeypatch.setattr(pipeline.diarize, "diarize_wav", lambda *a, **k: FakeResult())
    env = _env(tmp_path, models, "cuda_oom:diarize:1")
    run_stage("diarize", JobSpec(job_id="oom-c", source="x"), env)
    assert models.pipe.moves == ["cpu", "cuda"]  # run on the CPU once, then home for the next job
    assert _stage_notes(env.workspace("oom-c")) == ["diarization: out of GPU memory at batch size 1; fell back to CPU"]


def test_diarize_oom_on_cpu_at_batch_one_is_gpu_memory_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = Models("cpu")
    models.pipe.embedding_batch_size = 1
    monkeypatch.setattr(pipeline.diarize, "diarize_wav", lambda *a, **k: FakeResult())
    with pytest.raises(GPUMemoryError):
        run_stage("diarize", JobSpec(job_id="oom-e", source="x"), _env(tmp_path, models, "cuda_oom:diarize:5"))


def test_align_oom_halves_the_batch_and_notes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.transcribe import Transcript

    models = Models("cpu")
    batches: list[int] = []

    def fake_align(asr: Any, wav: Any, transcript: Any, *, batch_size: int, hook: Any) -> Any:
        batches.append(batch_size)
        return pipeline.align.Alignment.from_dict({"segments": [], "method": "whisper", "model": None})

    monkeypatch.setattr(pipeline.align, "align_with_whisper", fake_align)
    env = _env(tmp_path, models, "cuda_oom:align:1")
    ws = env.workspace("oom-a")
    ws.write_json("transcript.json", Transcript(segments=[], language="en").to_dict())
    run_stage("align", JobSpec(job_id="oom-a", source="x"), env)
    assert batches == [2]  # CPU default 4 -> 2
    assert ws.has("alignment.json")
    assert _stage_notes(ws) == ["word alignment: out of GPU memory at batch size 4; retried with 2"]
