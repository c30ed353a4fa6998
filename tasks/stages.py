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
from typing import Any

import structlog

from ecg_audio.jobs import JobStatus
from ecg_audio.stage_table import ASSEMBLING, STAGE_BY_NAME, STAGE_NAMES, STAGES, STEP_KEYS, VAD
from media_io.workspace import Workspace
from pipeline.audio import release_freed_memory
from tasks.devices import diarization_settings, on_device
from tasks.oom import oom_fallback
from tasks.stage_env import StageEnv
from tasks.storage import upload_source, write_output

log = structlog.get_logger("ecg.stages")

_Body = Callable[["JobSpec", "StageEnv", Workspace], None]
_BODIES: dict[str, _Body] = {}


def stage_body(name: str) -> Callable[[_Body], _Body]:
    """Registers the body of the stage ``name`` of the stage table (ecg_audio/stage_table.py)."""

    def register(body: _Body) -> _Body:
        _BODIES[name] = body
        return body

    return register


def stage_bodies() -> dict[str, _Body]:
    """The registered stage bodies by name (the enrollment task reuses ingest's)."""
    return dict(_BODIES)


def _within(stage: str, fraction: float, *, start: int | None = None) -> int:
    """Progress part-way through a stage: between the previous milestone and this stage's, never reaching it
    (the stage's own milestone is reported when its artifact is written)."""
    end = STAGE_BY_NAME[stage].done.progress
    if start is None:
        i = STAGE_NAMES.index(stage)
        start = STAGES[i - 1].done.progress if i else 0
    return min(end - 1, start + int((end - start) * max(0.0, min(1.0, fraction))))


@dataclass
class JobSpec:
    """What travels between stages (small: no audio, no results)."""

    job_id: str
    source: str
    language: str | None = None
    callback_url: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

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


@dataclass
class StageOutcome:
    stage: str
    skipped: bool
    seconds: float


def run_stage(name: str, job: JobSpec, env: StageEnv) -> StageOutcome:
    """Run one stage unless its checkpoint exists. Reports the stage's milestone either way."""
    row = STAGE_BY_NAME[name]
    artifact, progress, message = row.artifact, row.done.progress, row.done.key
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
    """``env`` whose reporter takes message keys: the one place a stage's progress becomes text, in the
    job's locale (``ecg_audio.messages``)."""
    from ecg_audio.messages import resolve_locale, text

    locale = resolve_locale(job_locale(job, env))
    report = env.report
    return dataclasses.replace(env, report=lambda stage, p, key: report(stage, p, text(key, locale)))


# --- stage bodies ---------------------------------------------------------


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
        source, policy = upload_source(source, env, policy)
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
            env.report("diarize", progress, STEP_KEYS["detecting_voice_activity"])
        else:
            done = max(0.0, min(1.0, (fraction - 0.3) / 0.7))
            if done == 0.0:
                env.report("diarize", VAD.progress, VAD.key)
            else:
                env.report("diarize", _within("diarize", done, start=VAD.progress), STEP_KEYS["finding_speakers"])

    def attempt(batch: int, device: str) -> Any:
        # window by window on long files: memory is bounded by a window, not the recording
        with diarization_settings(pipeline, batch, device, env.models.device):
            return diarize_wav(
                pipeline,
                ws.path("audio.wav"),
                num_speakers=opts.get("num_speakers"),
                min_speakers=opts.get("min_speakers"),
                max_speakers=opts.get("max_speakers"),
                hook=hook,
            )

    batch = int(getattr(pipeline, "embedding_batch_size", 1) or 1)
    result, notes = oom_fallback("diarize", "diarization", job.job_id, env, ws, attempt, batch)
    _add_notes(ws, "diarize", notes)
    ws.write_json("diarization.json", {**result.to_dict(), "model": name})


@stage_body("transcribe")
def _transcribe(job: JobSpec, env: StageEnv, ws: Workspace) -> None:
    from ecg_audio.languages import normalize
    from pipeline.transcribe import transcribe

    language = normalize(job.language or job.options.get("language"))  # 'ko-KR' -> 'ko'
    # said at once: language detection and the first batch take seconds before the first 'asr'
    # report, and the record would say 'diarize' all that while (a DELETE then seems to land there)
    env.report("transcribe", _within("transcribe", 0.0), STEP_KEYS["transcribing"])
    # the diarization's turns: where a chunk changes speaker, and the speech that must get words
    turns = [(t["start"], t["end"], t["speaker"]) for t in ws.read_json("diarization.json").get("turns", [])]

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
                env.report("transcribe", _within("transcribe", f), STEP_KEYS["transcribing"]) if step == "asr" else None
            ),
            # Whisper's word times come nearly free with the decoding: the fallback wherever
            # no wav2vec2 aligner is configured for a language
            word_timestamps=True,
            speech_turns=turns,
            prompt=job.options.get("prompt"),
            hotwords=job.options.get("hotwords"),
        )
        return transcript, model, name, batch, device

    first_batch = int(job.options.get("batch_size") or env.asr_batch_size(env.models.device))
    (transcript, model, name, batch, device), notes = oom_fallback(
        "transcribe", "transcription", job.job_id, env, ws, attempt, first_batch
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
    from pipeline.exports import subtitle_options

    settings = getattr(env.models, "settings", None) or get_settings()
    check_job(job.language or job.options.get("language"), job.options.get("model"), settings)
    subtitle_options(job.options.get("subtitles"))  # refused before any work, not at the last stage


def _add_notes(ws: Workspace, stage: str, notes: list[str]) -> None:
    """Kept beside the stage's artifact (written before it) for merge to put in ``metadata.notes``."""
    if notes:
        kept = ws.read_json("notes.json") if ws.has("notes.json") else {}
        kept[stage] = notes
        ws.write_json("notes.json", kept)


def _stage_notes(ws: Workspace) -> list[str]:
    kept = ws.read_json("notes.json") if ws.has("notes.json") else {}
    return [n for stage in STAGE_NAMES for n in kept.get(stage, [])]


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
                hook=lambda f: env.report("align", _within("align", f), STEP_KEYS["timing_words"]),
            )

        def wav2vec2_words(part: Transcript, aligner: tuple[Any, str]) -> Any:
            model, name = aligner
            with on_device(model[0] if isinstance(model, tuple) else model, device, env.models.device):
                return align_with_wav2vec2(model, ws.path("audio.wav"), part, device=device, name=name)

        return align_by_language(transcript, env.models.aligner, whisper_words, wav2vec2_words)

    batch = env.asr_batch_size(env.models.device)
    alignment, notes = oom_fallback("align", "word alignment", job.job_id, env, ws, attempt, batch)
    _add_notes(ws, "align", notes)
    ws.write_json("alignment.json", alignment.to_dict())


@stage_body("features")
def _features(job: JobSpec, env: StageEnv, ws: Workspace) -> None:
    from pipeline.features import compute_tracks

    tracks = compute_tracks(
        ws.path("audio.wav"),
        hook=lambda f: env.report("features", _within("features", f), STEP_KEYS["measuring_voices"]),
        threads=getattr(env.models, "cpu_threads", None),
    )
    tmp = ws.tmp_path(".npz")
    tracks.save(tmp)
    ws.commit_file("features.npz", tmp)


@stage_body("merge")
def _merge(job: JobSpec, env: StageEnv, ws: Workspace) -> None:
    from pipeline.align import Alignment
    from pipeline.coverage import coverage_metadata
    from pipeline.diarize import DiarizationResult
    from pipeline.exports import exports, subtitle_options
    from pipeline.features import FeatureTracks
    from pipeline.merge import assemble

    t0 = time.perf_counter()
    env.report("merge", ASSEMBLING.progress, ASSEMBLING.key)
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
    if env.speakers is not None:  # speakers by name: the job's labels matched with its key's voices
        from pipeline.voiceprints import identify_speakers

        identify_speakers(result, DiarizationResult.from_dict(diar), env.speakers, job.job_id, job.options)
    md = result["metadata"]
    md.update(coverage_metadata(result, transcript.get("gaps") or [], transcript.get("second_pass") or {}))
    log.info("speech_coverage", job_id=job.job_id, speech_coverage=md["speech_coverage"], gaps=len(md["gaps"]))
    if md.get("coverage_note"):
        md["notes"].append(md.pop("coverage_note"))
        log.warning(
            "low_speech_coverage", job_id=job.job_id, speech_coverage=md["speech_coverage"], gaps=md["gaps"][:20]
        )
    # inside the transcribe stage's time: what identifying the languages cost (0 when given)
    md["language_id_s"] = float(transcript.get("language_id_s") or 0.0)
    md["stage_times"]["merge"] = round(time.perf_counter() - t0, 3)
    md["processing_time"] = round(sum(md["stage_times"].values()), 3)
    md["subtitles"] = subtitle_options(job.options.get("subtitles"))  # every rendering of the exports reads it
    envelope = {"job_id": job.job_id, "status": JobStatus.COMPLETED, "result": result}
    for ext, text in exports(result, job.job_id).items():
        write_output(env, f"{job.job_id}.{ext}", text)
    ws.write_json("result.json", envelope)
    # the JSON is written last: its presence in output/ means the job is complete
    write_output(env, f"{job.job_id}.json", json.dumps(envelope, ensure_ascii=False, indent=1))


# every row of the stage table has a body, and every body a row
if set(_BODIES) != set(STAGE_NAMES):
    raise RuntimeError(f"stage table {STAGE_NAMES} and stage bodies {sorted(_BODIES)} differ")
