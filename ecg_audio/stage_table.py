"""The stages of a job, in one table: everything else about them is derived from it.

``celeryconfig`` takes the chain, the queue of each task and its time limits from here; the
task module registers one Celery task per row; the stage bodies (``tasks/stages.py``) take
each stage's checkpoint artifact and closing milestone. Adding a stage is one row here and
its body (registered with ``tasks.stages.stage_body``).

Each progress message has a stable key beside its English text, so a message catalog in
another language can be keyed by it. Torch-free and Celery-free: the shim reads it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from ecg_audio.queues import CPU_QUEUE, MODEL_QUEUE

TASK_PREFIX = "ecg."


@dataclass(frozen=True)
class Milestone:
    """A point of a job's progress: ``progress`` percent, said as ``message``."""

    key: str
    progress: int
    message: str


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
    Stage("ingest", CPU_QUEUE, 1800, "ingest.json", Milestone("input_ready", 10, "Input ready: audio extracted")),
    Stage("diarize", MODEL_QUEUE, 3 * 3600, "diarization.json", Milestone("speakers", 40, "Speakers found")),
    Stage("transcribe", MODEL_QUEUE, 3 * 3600, "transcript.json", Milestone("transcription", 60, "Transcription done")),
    Stage("align", MODEL_QUEUE, 3600, "alignment.json", Milestone("word_times", 70, "Word timestamps done")),
    Stage("features", CPU_QUEUE, 3600, "features.npz", Milestone("features", 80, "Voice features measured")),
    Stage("merge", CPU_QUEUE, 600, "result.json", Milestone("done", 100, "Done")),
)
STAGE_BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)

# milestones reported inside a stage
VAD = Milestone("vad", 25, "Voice activity detected")
ASSEMBLING = Milestone("assembling", 85, "Assembling the result")

# what a stage says while it works (the progress figure moves between its milestones)
STEP_MESSAGES: dict[str, str] = {
    "detecting_voice_activity": "Detecting voice activity",
    "finding_speakers": "Finding speakers",
    "transcribing": "Transcribing",
    "timing_words": "Timing words",
    "measuring_voices": "Measuring voices",
}

# every progress message by its key
MESSAGES: dict[str, str] = {
    **{s.done.key: s.done.message for s in STAGES},
    VAD.key: VAD.message,
    ASSEMBLING.key: ASSEMBLING.message,
    **STEP_MESSAGES,
}
MESSAGE_KEYS: dict[str, str] = {text: key for key, text in MESSAGES.items()}
"""English message -> key, for code that receives the message (callbacks, the job record)."""
