"""The stages of a job, in one table: everything else about them is derived from it.

``celeryconfig`` takes the chain, the queue of each task and its time limits from here; the
task module registers one Celery task per row; the stage bodies (``tasks/stages.py``) take
each stage's checkpoint artifact and closing milestone. Adding a stage is one row here and
its body (registered with ``tasks.stages.stage_body``).

Progress is reported as message keys (``ecg_audio.messages`` holds their text in each locale; the
reporter renders it once, in the job's locale). Torch-free and Celery-free: the shim reads it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from ecg_audio.queues import CPU_QUEUE, MODEL_QUEUE

TASK_PREFIX = "ecg."


@dataclass(frozen=True)
class Milestone:
    """A point of a job's progress: ``progress`` percent, said as the message ``key``."""

    key: str
    progress: int


@dataclass(frozen=True)
class Stage:
    name: str
    queue: str
    """Model stages hold the GPU; CPU and I/O stages run beside them on another worker."""
    hard_limit_s: int
    """The soft limit (95 %) fires first, so the stage fails with TIMEOUT_ERROR and a message."""
    artifact: str
    """The checkpoint: when it exists in the workspace, the stage is done."""
    done: Milestone
    """Reported when the stage's artifact is written (or found)."""

    @property
    def task_name(self) -> str:
        return TASK_PREFIX + self.name


STAGES: tuple[Stage, ...] = (
    Stage("ingest", CPU_QUEUE, 1800, "ingest.json", Milestone("input_ready", 10)),
    Stage("diarize", MODEL_QUEUE, 3 * 3600, "diarization.json", Milestone("speakers", 40)),
    Stage("transcribe", MODEL_QUEUE, 3 * 3600, "transcript.json", Milestone("transcription", 60)),
    Stage("align", MODEL_QUEUE, 3600, "alignment.json", Milestone("word_times", 70)),
    Stage("features", CPU_QUEUE, 3600, "features.npz", Milestone("features", 80)),
    Stage("merge", CPU_QUEUE, 600, "result.json", Milestone("done", 100)),
)
STAGE_BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)

# milestones reported inside a stage
VAD = Milestone("vad", 25)
ASSEMBLING = Milestone("assembling", 85)

# what a stage says while it works, by step (message keys; the progress figure moves between milestones)
STEP_KEYS: dict[str, str] = {
    "detecting_voice_activity": "vad.running",
    "finding_speakers": "speakers.running",
    "transcribing": "transcription.running",
    "timing_words": "word_times.running",
    "measuring_voices": "features.running",
}

# every message key a stage reports (each has its text in every locale: a test checks)
REPORTED_KEYS: tuple[str, ...] = (*(s.done.key for s in STAGES), VAD.key, ASSEMBLING.key, *STEP_KEYS.values())
