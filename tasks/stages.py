"""Stage bodies: read the job's artifacts, call one pipeline function, write one artifact.

These functions know neither Celery nor HTTP, so the Celery tasks and the
in-process ``ecg-audio analyze`` run exactly the same code. Each stage is a
checkpoint: when its artifact already exists (a redelivered or requeued job),
it does no work and says so.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from ecg_audio.stage_table import ASSEMBLING, STAGE_BY_NAME, STAGE_NAMES, STAGES, STEP_MESSAGES, VAD
from media_io.workspace import S3Workspace, Workspace
from pipeline.audio import release_freed_memory
from pipeline.errors import GPUMemoryError, InvalidMediaError, is_cuda_oom

log = structlog.get_logger("ecg.stages")

_Body = Callable[["JobSpec", "StageEnv", Workspace], None]
_BODIES: dict[str, _Body] = {}


def stage_body(name: str) -> Callable[[_Body], _Body]:
    """Registers the body of the stage ``name`` of the stage table (ecg_audio/stage_table.py)."""

    def register(body: _Body) -> _Body:
        _BODIES[name] = body
        return body

    return register


def _within(stage: str, fraction: float, *, start: int | None = None) -> int:
    """Progress part-way through a stage: between the previous milestone and this stage's, never reaching it
    (the stage's own milestone is reported when its artifact is written)."""
    end = STAGE_BY_NAME[stage].done.progress
    if start is None:
        i = STAGE_NAMES.index(stage)
        start = STAGES[i - 1].done.progress if i else 0
    return min(end - 1, start + int((end - start) * max(0.0, min(1.0, fraction))))


class ModelProvider(Protocol):
    device: str

    def asr(self, language: str | None = None, *, device: str | None = None) -> tuple[Any, str]: ...

    def asr_route(
        self, language: str | None = None, *, model: str | None = None, device: str | None = None
    ) -> tuple[Any, str]: ...

    def diarization(self) -> tuple[Any, str]: ...

    def aligner(self, language: str) -> tuple[Any, str] | None: ...


class Reporter(Protocol):
    def __call__(self, stage: str, progress: int, message: str) -> None: ...


@dataclass
class JobSpec:
    """What travels between stages (small: no audio, no results)."""

    job_id: str
    source: str
    language: str | None = None
    callback_url: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "source": self.source,
            "language": self.language,
            "callback_url": self.callback_url,
            "options": self.options,
        }

    @classmethod
    def from_request(cls, job_id: str, request: dict[str, Any]) -> JobSpec:
        """From the job record's request (what the shim accepted)."""
        return cls(
            job_id=job_id,
            source=request["video_url"],
            language=request.get("language"),
            callback_url=request.get("callback_url"),
            options={k: v for k, v in (request.get("options") or {}).items() if v is not None},
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobSpec:
        return cls(
            job_id=d["job_id"],
            source=d["source"],
            language=d.get("language"),
            callback_url=d.get("callback_url"),
            options=dict(d.get("options") or {}),
        )


@dataclass
class StageEnv:
    """Everything a stage needs besides the job: built from settings by the caller."""

    workspace_root: Path
    output_root: Path
    models: ModelProvider
    report: Reporter
    batch_size: int | None = None  # ASR batch; None: 8 on CUDA, 4 on CPU (see asr_batch_size)
    max_download_bytes: int = 4 * 1024**3
    max_duration_s: float = 4 * 3600.0
    network_timeout_s: float = 30.0
    url_policy: Any = None  # media_io.urlguard.UrlPolicy
    s3_client_factory: Callable[[], Any] | None = None
    fault_injection: str | None = None
    keep_workspace: bool = False
    uploads_dir: Path | None = None  # where upload://<id> inputs live
    s3_bucket: str | None = None  # set: workspace under s3://bucket/temp/{job}/, results under output/
    _s3: Any = None

    def asr_batch_size(self, device: str) -> int:
        """4 on CPU: no slower than 8 there (the CPU is busy either way) with half the encoder's
        attention memory; 8 on a GPU, where a larger batch keeps it busy."""
        return self.batch_size or (4 if device == "cpu" else 8)

    def s3(self) -> Any:
        if self._s3 is None:
            if self.s3_client_factory is None:
                raise RuntimeError("an S3 workspace needs an S3 client factory")
            self._s3 = self.s3_client_factory()
        return self._s3

    def workspace(self, job_id: str) -> Workspace:
        if self.s3_bucket:
            return S3Workspace.open_s3(self.workspace_root, job_id, self.s3(), self.s3_bucket)
        return Workspace.open(self.workspace_root, job_id)

    def write_output(self, name: str, text: str) -> str:
        """Write a result file where results go: ``s3://bucket/output/`` or the local output root."""
        if self.s3_bucket:
            self.s3().put_object(Bucket=self.s3_bucket, Key=f"output/{name}", Body=text.encode())
            return f"s3://{self.s3_bucket}/output/{name}"
        self.output_root.mkdir(parents=True, exist_ok=True)
        path = self.output_root / name
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return str(path)


@dataclass
class StageOutcome:
    stage: str
    skipped: bool
    seconds: float


def run_stage(name: str, job: JobSpec, env: StageEnv) -> StageOutcome:
    """Run one stage unless its checkpoint exists. Reports the stage's milestone either way."""
    row = STAGE_BY_NAME[name]
    artifact, progress, message = row.artifact, row.done.progress, row.done.message
    env = _localized(env, job)
    ws = env.workspace(job.job_id)
    if ws.has(artifact):
        log.info("stage_skipped", job_id=job.job_id, stage=name, reason="checkpoint exists")
        env.report(name, progress, message)
        return StageOutcome(name, True, 0.0)
    t0 = time.perf_counter()
    try:
        _BODIES[name](job, env, ws)
    finally:
        release_freed_memory()
    seconds = time.perf_counter() - t0
    times = ws.read_json("times.json") if ws.has("times.json") else {}
    times[name] = round(seconds, 3)
    ws.write_json("times.json", times)
    log.info("stage_done", job_id=job.job_id, stage=name, seconds=round(seconds, 3))
    if name != "merge":
        env.report(name, progress, message)
    return StageOutcome(name, False, seconds)


def job_locale(job: JobSpec, env: StageEnv | None = None) -> str:
    """The locale of the job's messages: options.locale, else the deployment's default."""
    settings = getattr(env.models, "settings", None) if env is not None else None
    if settings is None:
        from ecg_audio.settings import get_settings

        settings = get_settings()
    return str(job.options.get("locale") or settings.default_locale)


def _localized(env: StageEnv, job: JobSpec) -> StageEnv:
    """``env`` whose reporter speaks the job's locale (the stages report English; ecg_audio.messages)."""
    from ecg_audio.messages import localize, resolve_locale

    locale = resolve_locale(job_locale(job, env))
    if locale == "en":
        return env
    report = env.report
    return dataclasses.replace(env, report=lambda stage, p, m: report(stage, p, localize(m, locale)))


# --- fault injection (tests only) --------------------------------------


class InjectedOutOfMemoryError(RuntimeError):
    """Looks like CUDA's OOM to the handling code: ``CUDA out of memory`` in the message."""


def _maybe_inject(env: StageEnv, stage: str, ws: Workspace) -> None:
    """``cuda_oom:<stage>:<n>`` raises a CUDA OOM the first n times the stage runs for a job."""
    if not env.fault_injection:
        return
    for rule in env.fault_injection.split(","):
        parts = rule.strip().split(":")
        if len(parts) == 3 and parts[0] == "cuda_oom" and parts[1] == stage:
            counter = ws.path(f"fault-{stage}.count")
            seen = int(counter.read_text()) if counter.exists() else 0
            if seen < int(parts[2]):
                counter.write_text(str(seen + 1))
                raise InjectedOutOfMemoryError("CUDA out of memory (injected by ECG_FAULT_INJECTION)")


# --- stage bodies ---------------------------------------------------------


UPLOAD_GONE = "the uploaded file is gone (uploads are kept for a limited time: upload it again)"


def _upload_source(url: str, env: StageEnv, policy: Any) -> tuple[str, Any]:
    """Where ``upload://<id>`` lives: ``s3://<bucket>/uploads/<id>`` with an S3 workspace (the
    shim put it there), else ``<uploads_dir>/<id>``; and the URL policy that admits it."""
    from ecg_audio.uploads import s3_key, upload_id

    upload = upload_id(url)
    if upload is None:
        raise InvalidMediaError("malformed upload id: expected upload://<32 hex digits>")
    if env.s3_bucket:
        from botocore.exceptions import ClientError

        try:
            env.s3().head_object(Bucket=env.s3_bucket, Key=s3_key(upload))
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code"))
            if code in {"404", "NoSuchKey", "NotFound"}:
                raise InvalidMediaError(UPLOAD_GONE) from None
            # throttled (503 SlowDown) or an S3 hiccup: the stage is retried, not failed as an internal error
            from pipeline.errors import DownloadError

            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            retryable = not (isinstance(status, int) and 400 <= status < 500 and status not in (408, 429))
            raise DownloadError(f"the uploaded file could not be checked: S3 said {code}", retryable=retryable) from e
        # this one object, although uploads/ is no input location for jobs
        admit_s3 = dataclasses.replace(
            policy,
            allowed_schemes=frozenset(policy.allowed_schemes) | {"s3"},
            s3_inputs=(f"{env.s3_bucket}/{s3_key(upload)}",),
            s3_denied=(),
        )
        return f"s3://{env.s3_bucket}/{s3_key(upload)}", admit_s3
    if env.uploads_dir is None:
        raise InvalidMediaError("uploads are not enabled on this worker")
    path = env.uploads_dir / upload
    if not path.is_file():
        raise InvalidMediaError(UPLOAD_GONE)
    return str(path), dataclasses.replace(policy, allow_local_files=True)


@stage_body("ingest")
def _ingest(job: JobSpec, env: StageEnv, ws: Workspace) -> None:
    from media_io.fetch import FetchLimits, fetch_to_file
    from media_io.urlguard import UrlPolicy, redact_url
    from pipeline.media import extract_audio

    _check_languages(job, env)  # a language or model no configured model serves: refused before any work
    limits = FetchLimits(max_bytes=env.max_download_bytes, timeout_s=env.network_timeout_s)
    downloads = ws.root / "download"
    downloads.mkdir(exist_ok=True)
    source, policy = job.source, env.url_policy or UrlPolicy()
    if source.startswith("upload://"):
        source, policy = _upload_source(source, env, policy)
    src = fetch_to_file(
        source,
        downloads,
        policy=policy,
        limits=limits,
        s3_client_factory=env.s3_client_factory,
    )
    tmp = ws.tmp_path(".wav")
    try:
        extracted = extract_audio(src, tmp, max_duration_s=env.max_duration_s)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    ws.commit_file("audio.wav", extracted.wav_path)
    if src.parent == downloads:
        src.unlink(missing_ok=True)  # the WAV is all later stages need
    ws.write_json(
        "ingest.json",
        {"duration": round(extracted.duration, 3), "media": extracted.info.to_dict(), "source": redact_url(job.source)},
    )


@stage_body("diarize")
def _diarize(job: JobSpec, env: StageEnv, ws: Workspace) -> None:
    from pipeline.diarize import diarize_wav

    pipeline, name = env.models.diarization()
    opts = job.options

    def hook(step: str, fraction: float) -> None:
        # segmentation ends at ~30% of the diarization work: that is voice activity known
        # (on a long file, windowed, 30% of the whole file's work)
        if fraction < 0.3:
            before = STAGE_BY_NAME["ingest"].done.progress
            progress = min(VAD.progress - 1, before + int((VAD.progress - before) * fraction / 0.3))
            env.report("diarize", progress, STEP_MESSAGES["detecting_voice_activity"])
        else:
            done = max(0.0, min(1.0, (fraction - 0.3) / 0.7))
            if done == 0.0:
                env.report("diarize", VAD.progress, VAD.message)
            else:
                env.report("diarize", _within("diarize", done, start=VAD.progress), STEP_MESSAGES["finding_speakers"])

    def attempt(batch: int, device: str) -> Any:
        # window by window on long files: memory is bounded by a window, not the recording
        with _diarization_settings(pipeline, batch, device, env.models.device):
            return diarize_wav(
                pipeline,
                ws.path("audio.wav"),
                num_speakers=opts.get("num_speakers"),
                min_speakers=opts.get("min_speakers"),
                max_speakers=opts.get("max_speakers"),
                hook=hook,
            )

    batch = int(getattr(pipeline, "embedding_batch_size", 1) or 1)
    result, notes = _oom_fallback("diarize", "diarization", job, env, ws, attempt, batch)
    _add_notes(ws, "diarize", notes)
    ws.write_json("diarization.json", {**result.to_dict(), "model": name})


@stage_body("transcribe")
def _transcribe(job: JobSpec, env: StageEnv, ws: Workspace) -> None:
    from ecg_audio.languages import normalize
    from pipeline.transcribe import transcribe

    language = normalize(job.language or job.options.get("language"))  # 'ko-KR' -> 'ko'
    # said at once: language detection and the first batch take seconds before the first 'asr'
    # report, and the record would say 'diarize' all that while (a DELETE then seems to land there)
    env.report("transcribe", _within("transcribe", 0.0), STEP_MESSAGES["transcribing"])

    def attempt(batch: int, device: str) -> Any:
        model, name = env.models.asr_route(language, model=job.options.get("model"), device=device)
        transcript = transcribe(
            model,
            ws.path("audio.wav"),
            batch_size=batch,
            language=language,
            # 'asr' is the fraction of the file decoded; 'vad' (1.0 once the first window's
            # speech is found) would jump the record to the stage's end at once
            hook=lambda step, f: (
                env.report("transcribe", _within("transcribe", f), STEP_MESSAGES["transcribing"])
                if step == "asr"
                else None
            ),
            # Whisper's word times come nearly free with the decoding: the fallback wherever
            # no wav2vec2 aligner is configured for a language
            word_timestamps=True,
        )
        return transcript, model, name, batch, device

    first_batch = int(job.options.get("batch_size") or env.asr_batch_size(env.models.device))
    (transcript, model, name, batch, device), notes = _oom_fallback(
        "transcribe", "transcription", job, env, ws, attempt, first_batch
    )
    ws.write_json(
        "transcript.json",
        {
            **transcript.to_dict(),
            "model": model.labels_for(transcript.languages) if hasattr(model, "labels_for") else name,
            "batch_size": batch,
            "device": device,
            # the CTranslate2 compute type the models ran (ECG_COMPUTE_TYPE=auto chooses it per CPU)
            "compute_type": _compute_type(env.models, device),
            "notes": notes,
        },
    )


def _compute_type(models: Any, device: str) -> str | None:
    choose = getattr(models, "compute_type", None)
    return str(choose(device)) if callable(choose) else None


def _check_languages(job: JobSpec, env: StageEnv) -> None:
    from ecg_audio.languages import check_job
    from ecg_audio.settings import get_settings

    settings = getattr(env.models, "settings", None) or get_settings()
    check_job(job.language or job.options.get("language"), job.options.get("model"), settings)


def _oom_fallback(
    stage: str, what: str, job: JobSpec, env: StageEnv, ws: Workspace, attempt: Callable[[int, str], Any], batch: int
) -> tuple[Any, list[str]]:
    """``attempt(batch, device)`` with the treatment transcribe gives a CUDA out-of-memory error:
    half the batch, then the CPU, each step noted for ``metadata.notes``; out of memory at batch 1
    on the CPU is GPU_MEMORY_ERROR."""
    device = env.models.device
    notes: list[str] = []
    while True:
        try:
            _maybe_inject(env, stage, ws)
            return attempt(batch, device), notes
        except Exception as e:
            if not is_cuda_oom(e):
                raise
            if batch > 1:
                notes.append(f"{what}: out of GPU memory at batch size {batch}; retried with {batch // 2}")
                batch //= 2
            elif device != "cpu":
                notes.append(f"{what}: out of GPU memory at batch size 1; fell back to CPU")
                device = "cpu"
            else:
                raise GPUMemoryError(f"{what}: out of memory even at batch size 1 on CPU") from e
            log.warning("cuda_oom_recovered", job_id=job.job_id, stage=stage, batch_size=batch, device=device)


def _add_notes(ws: Workspace, stage: str, notes: list[str]) -> None:
    """Kept beside the stage's artifact (written before it) for merge to put in ``metadata.notes``."""
    if notes:
        kept = ws.read_json("notes.json") if ws.has("notes.json") else {}
        kept[stage] = notes
        ws.write_json("notes.json", kept)


def _stage_notes(ws: Workspace) -> list[str]:
    kept = ws.read_json("notes.json") if ws.has("notes.json") else {}
    return [n for stage in STAGE_NAMES for n in kept.get(stage, [])]


class _on_device:
    """Run a torch model on ``device`` for one attempt, then put it back (it is shared by later jobs)."""

    def __init__(self, model: Any, device: str, home: str) -> None:
        self.model, self.device, self.home = model, device, home
        self.moved = device != home and hasattr(model, "to")

    def __enter__(self) -> None:
        if self.moved:
            self.model.to(self.device)

    def __exit__(self, *exc: object) -> None:
        if self.moved:
            self.model.to(self.home)
            release_freed_memory()


class _diarization_settings(_on_device):
    """Diarization at a smaller batch (segmentation and embedding) and/or on the CPU, restored after."""

    def __init__(self, pipeline: Any, batch: int, device: str, home: str) -> None:
        super().__init__(pipeline, device, home)
        self.batch = batch
        self.saved = {
            k: getattr(pipeline, k) for k in ("embedding_batch_size", "segmentation_batch_size") if hasattr(pipeline, k)
        }

    def __enter__(self) -> None:
        for k, v in self.saved.items():
            if v and v > self.batch:
                setattr(self.model, k, self.batch)
        if self.moved:
            import torch

            self.model.to(torch.device(self.device))

    def __exit__(self, *exc: object) -> None:
        for k, v in self.saved.items():
            setattr(self.model, k, v)
        if self.moved:
            import torch

            self.model.to(torch.device(self.home))
            release_freed_memory()


@stage_body("align")
def _align(job: JobSpec, env: StageEnv, ws: Workspace) -> None:
    from pipeline.align import align_by_language, align_with_wav2vec2, align_with_whisper
    from pipeline.transcribe import Transcript

    tdata = ws.read_json("transcript.json")
    transcript = Transcript.from_dict(tdata)

    def attempt(batch: int, device: str) -> Any:
        def whisper_words(part: Transcript) -> Any:
            timed = all(s.words is not None for s in part.segments)
            # words timed by the transcribe stage need no model here
            asr_device = device if device == "cpu" else tdata.get("device")
            asr = None if timed else env.models.asr(part.language, device=asr_device)[0]
            return align_with_whisper(
                asr,
                ws.path("audio.wav"),
                part,
                batch_size=batch,
                hook=lambda f: env.report("align", _within("align", f), STEP_MESSAGES["timing_words"]),
            )

        def wav2vec2_words(part: Transcript, aligner: tuple[Any, str]) -> Any:
            model, name = aligner
            with _on_device(model[0] if isinstance(model, tuple) else model, device, env.models.device):
                return align_with_wav2vec2(model, ws.path("audio.wav"), part, device=device, name=name)

        return align_by_language(transcript, env.models.aligner, whisper_words, wav2vec2_words)

    batch = env.asr_batch_size(env.models.device)
    alignment, notes = _oom_fallback("align", "word alignment", job, env, ws, attempt, batch)
    _add_notes(ws, "align", notes)
    ws.write_json("alignment.json", alignment.to_dict())


@stage_body("features")
def _features(job: JobSpec, env: StageEnv, ws: Workspace) -> None:
    from pipeline.features import compute_tracks

    tracks = compute_tracks(
        ws.path("audio.wav"),
        hook=lambda f: env.report("features", _within("features", f), STEP_MESSAGES["measuring_voices"]),
    )
    tmp = ws.tmp_path(".npz")
    tracks.save(tmp)
    ws.commit_file("features.npz", tmp)


@stage_body("merge")
def _merge(job: JobSpec, env: StageEnv, ws: Workspace) -> None:
    from pipeline.align import Alignment
    from pipeline.diarize import DiarizationResult
    from pipeline.features import FeatureTracks
    from pipeline.merge import assemble, exports

    t0 = time.perf_counter()
    env.report("merge", ASSEMBLING.progress, ASSEMBLING.message)
    ingest = ws.read_json("ingest.json")
    transcript = ws.read_json("transcript.json")
    diar = ws.read_json("diarization.json")
    alignment = Alignment.from_dict(ws.read_json("alignment.json"))
    times = ws.read_json("times.json") if ws.has("times.json") else {}
    result = assemble(
        alignment,
        DiarizationResult.from_dict(diar),
        FeatureTracks.load(ws.path("features.npz")),
        duration=ingest["duration"],
        language=transcript["language"],
        language_probability=transcript.get("language_probability"),
        languages=transcript.get("languages") or {},
        models={
            "asr": transcript.get("model"),
            "asr_compute_type": transcript.get("compute_type"),
            "diarization": diar.get("model"),
            "alignment": alignment.method if alignment.model is None else f"{alignment.method}:{alignment.model}",
        },
        device=transcript.get("device") or env.models.device,
        stage_times=times,
        notes=[*(transcript.get("notes") or []), *_stage_notes(ws)],
    )
    md = result["metadata"]
    md["stage_times"]["merge"] = round(time.perf_counter() - t0, 3)
    md["processing_time"] = round(sum(md["stage_times"].values()), 3)
    envelope = {"job_id": job.job_id, "status": "completed", "result": result}
    for ext, text in exports(result, job.job_id).items():
        env.write_output(f"{job.job_id}.{ext}", text)
    ws.write_json("result.json", envelope)
    # the JSON is written last: its presence in output/ means the job is complete
    env.write_output(f"{job.job_id}.json", json.dumps(envelope, ensure_ascii=False, indent=1))


# every row of the stage table has a body, and every body a row
if set(_BODIES) != set(STAGE_NAMES):
    raise RuntimeError(f"stage table {STAGE_NAMES} and stage bodies {sorted(_BODIES)} differ")
