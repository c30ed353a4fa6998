"""Request and response models of the shim's routes (the OpenAPI document is built from them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.vocabulary import HOTWORDS_MAX_CHARS, PROMPT_MAX_CHARS, vocabulary_problem

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
JobStatus = Literal["queued", "processing", "completed", "failed"]


class JobOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_speakers: int | None = Field(None, ge=1, le=32, description="Exact number of speakers, when known.")
    min_speakers: int | None = Field(None, ge=1, le=32)
    max_speakers: int | None = Field(None, ge=1, le=32)
    model: str | None = Field(None, max_length=200, description="ASR model; one of those the workers have.")
    locale: Literal["en", "ko"] | None = Field(
        None, description="Language of progress and error messages; default: Accept-Language, then the server's."
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


class JobState(BaseModel):
    job_id: str
    status: JobStatus
    progress: int = Field(ge=0, le=100)
    message: str = ""
    stage: str | None = None
    result: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    created_at: float | None = None
    updated_at: float | None = None
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


class JobSummary(BaseModel):
    job_id: str
    status: JobStatus
    progress: int = Field(ge=0, le=100)
    message: str = ""
    stage: str | None = None
    error_code: str | None = None
    created_at: float | None = None
    updated_at: float | None = None


class JobPage(BaseModel):
    jobs: list[JobSummary]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null at the end.")


class Accepted(BaseModel):
    job_id: str
    status: str


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    broker: bool
    workers: int
    queue_depth: dict[str, int]


class UploadAccepted(BaseModel):
    video_url: str
    bytes: int
