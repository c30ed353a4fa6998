"""Request and response models of the shim's routes (the OpenAPI document is built from them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ecg_audio.jobs import JobStatus
from ecg_audio.messages import Locale
from ecg_audio.speakers import SPEAKER_ID_PATTERN
from pipeline.exports import SUBTITLE_OPTIONS

if TYPE_CHECKING:
    from ecg_audio.jobs import JobRecord
from pipeline.vocabulary import HOTWORDS_MAX_CHARS, PROMPT_MAX_CHARS, vocabulary_problem

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


# the ranges the exports check too (one definition): (type, lowest, highest)
_CHARS, _LINES, _CUE_S = (SUBTITLE_OPTIONS[k] for k in ("max_chars_per_line", "max_lines", "max_cue_s"))


class SubtitleOptions(BaseModel):
    """A job's subtitle layout, where it differs from the guide of the transcript's language."""

    model_config = ConfigDict(extra="forbid")

    max_chars_per_line: int | None = Field(
        None, ge=_CHARS[1], le=_CHARS[2], description="Default: 42 (English), 16 (Korean, Chinese), 13 (Japanese)."
    )
    max_lines: int | None = Field(None, ge=_LINES[1], le=_LINES[2], description="Lines a cue; default 2.")
    max_cue_s: float | None = Field(
        None, ge=_CUE_S[1], le=_CUE_S[2], description="Seconds a cue stays up at most; default 7."
    )


class JobOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_speakers: int | None = Field(None, ge=1, le=32, description="Exact number of speakers, when known.")
    min_speakers: int | None = Field(None, ge=1, le=32)
    max_speakers: int | None = Field(None, ge=1, le=32)
    model: str | None = Field(None, max_length=200, description="ASR model; one of those the workers have.")
    locale: Locale | None = Field(
        None, description="Language of progress and error messages; default: Accept-Language, then the server's."
    )
    subtitles: SubtitleOptions | None = Field(None, description="Subtitle layout of the SRT and VTT exports.")
    identify_speakers: bool | None = Field(
        None,
        description="Name speakers from this API key's speaker library (GET /speakers); default: on when it has any.",
    )
    speakers: list[Annotated[str, Field(pattern=SPEAKER_ID_PATTERN)]] | None = Field(
        None, max_length=200, description="Only these enrolled speakers (ids) are candidates; default: all the key's."
    )
    # vocabulary: both reach every ASR model's decoder (faster-whisper's initial_prompt and hotwords)
    prompt: str | None = Field(
        None,
        min_length=1,
        max_length=PROMPT_MAX_CHARS,
        description="Text the decoder reads before the audio (Whisper's initial prompt): the cast, brands and "
        "places of the show spelt as they should be, in the recording's language and style. Whisper reads "
        "only its last 223 tokens.",
    )
    hotwords: str | None = Field(
        None,
        min_length=1,
        max_length=HOTWORDS_MAX_CHARS,
        description="Names and terms to favour while decoding (faster-whisper's hotwords), space- or comma-separated.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> JobOptions:
        if self.num_speakers is not None and (self.min_speakers is not None or self.max_speakers is not None):
            raise ValueError("give either num_speakers, or min_speakers/max_speakers, not both")
        if self.min_speakers is not None and self.max_speakers is not None and self.min_speakers > self.max_speakers:
            raise ValueError("min_speakers must not exceed max_speakers")
        for name in ("prompt", "hotwords"):
            problem = vocabulary_problem(name, getattr(self, name))
            if problem:
                raise ValueError(problem)
        return self


class ProcessRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(
        ...,
        min_length=1,
        max_length=128,
        pattern=JOB_ID_PATTERN,
        description="Your id for the job: letters, digits, '.', '_', '-'. Posting it again returns the same job.",
    )
    video_url: str = Field(..., min_length=1, max_length=2048, description="https://, s3://, or an upload:// id.")
    language: str | None = Field(None, min_length=2, max_length=16, pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z]{2,4})?$")
    callback_url: str | None = Field(None, min_length=1, max_length=2048)
    options: JobOptions = Field(default_factory=JobOptions)

    @field_validator("job_id")
    @classmethod
    def _no_dots_only(cls, v: str) -> str:
        if ".." in v:
            raise ValueError("job_id must not contain '..'")
        return v


class JobSummary(BaseModel):
    """A job as its record stands (``from_record`` fills it); ``JobState`` adds what the record does not hold."""

    job_id: str
    status: JobStatus
    progress: int = Field(ge=0, le=100)
    message: str = ""
    stage: str | None = None
    error_code: str | None = None
    created_at: float | None = None
    updated_at: float | None = None


class JobState(JobSummary):
    result: dict[str, Any] | None = None
    error_message: str | None = None
    queue_position: int | None = Field(
        None, ge=0, description="While queued: how many jobs the workers take before this one."
    )
    eta_s: float | None = Field(
        None,
        ge=0,
        description="Seconds until done, from the audio's duration and measured stage speeds; "
        "null until both are known.",
    )
    view_url: str | None = Field(
        None, description="The job's page for a person (live progress, then the result): signed, expires; no API key"
    )


Model = TypeVar("Model", bound=JobSummary)


def from_record(model: type[Model], rec: JobRecord, **extra: Any) -> Model:
    """The one copy from a job record into a response model: every field of the model that the
    record holds, then ``extra`` (the result, the queue position...)."""
    return model(**{name: getattr(rec, name) for name in model.model_fields if hasattr(rec, name)}, **extra)


class JobPage(BaseModel):
    jobs: list[JobSummary]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null at the end.")


class Accepted(BaseModel):
    job_id: str
    status: JobStatus


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    broker: bool
    workers: int
    queue_depth: dict[str, int]


class UploadAccepted(BaseModel):
    video_url: str
    bytes: int
