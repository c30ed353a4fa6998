"""Run the whole pipeline in this process, no broker: what ``ecg-audio analyze`` does.

The same stage bodies as the Celery tasks, called in order, with a local
workspace and a model registry of this process.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ecg_audio.settings import Settings, get_settings, offline_model_env
from ecg_audio.stage_table import STAGE_BY_NAME, STAGE_NAMES
from tasks.stages import JobSpec, run_stage


def analyze(
    source: str,
    *,
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
    language: str | None = None,
    locale: str | None = None,
    model: str | None = None,
    subtitles: dict[str, Any] | None = None,
    prompt: str | None = None,
    hotwords: str | None = None,
    settings: Settings | None = None,
    registry: Any = None,
    on_progress: Callable[[str, int, str], None] | None = None,
    job_id: str | None = None,
    speakers_dir: Path | str | None = None,
) -> dict[str, Any]:
    """Analyze a local file or URL and return the job document ``{job_id, status, result}``.

    ``speakers_dir``: a folder of voice samples named by their speaker (``Alice.wav``, or several
    in ``Alice/``); the result names the speakers it recognises (offline: no library, no shim)."""
    offline_model_env()
    from ecg_audio.logs import quiet_model_warnings
    from tasks.context import stage_env
    from worker.models import get_registry

    quiet_model_warnings()
    s = settings or get_settings()
    _check_vocabulary(prompt, hotwords)
    registry = registry or get_registry(s)
    job = JobSpec(
        job_id=job_id or f"local-{uuid.uuid4().hex[:12]}",
        source=str(Path(source).resolve()) if Path(source).exists() else source,
        language=language,
        options={
            k: v
            for k, v in {
                "num_speakers": num_speakers,
                "min_speakers": min_speakers,
                "max_speakers": max_speakers,
                "locale": locale,
                "model": model,
                "subtitles": subtitles,
                "prompt": prompt,
                "hotwords": hotwords,
            }.items()
            if v is not None
        },
    )
    best = {"progress": -1}

    def report(stage: str, progress: int, message: str) -> None:
        if progress > best["progress"]:
            best["progress"] = progress
            if on_progress:
                on_progress(stage, progress, message)

    with tempfile.TemporaryDirectory(prefix="ecg-analyze-") as tmp:
        root = Path(tmp)
        env = stage_env(report, settings=s, model_provider=registry, allow_local_files=True)
        env.workspace_root = root / "workspaces"
        env.output_root = root / "output"
        env.s3_bucket = None  # in-process runs keep everything local
        env.speakers = None
        if speakers_dir is not None:
            from pipeline.voiceprints import FixedSpeakers

            voices = voices_from_folder(registry.diarization()[0], Path(speakers_dir), root)
            env.speakers = FixedSpeakers(voices, s.speaker_match_threshold)
        t0 = time.perf_counter()
        for name in STAGE_NAMES:
            run_stage(name, job, env)
        envelope: dict[str, Any] = env.workspace(job.job_id).read_json("result.json")
        envelope["result"]["metadata"]["wall_time"] = round(time.perf_counter() - t0, 3)
        envelope["exports"] = {
            p.suffix.lstrip("."): p.read_text() for p in env.output_root.glob(f"{job.job_id}.*") if p.suffix != ".json"
        }
        from ecg_audio.messages import text

        report("merge", 100, text(STAGE_BY_NAME["merge"].done.key, locale or s.default_locale))
        return envelope


def voices_from_folder(pipeline: Any, folder: Path, tmp: Path) -> list[Any]:
    """One voiceprint per speaker of ``folder``: each file ``NAME.ext`` is a sample of NAME, each
    subfolder ``NAME/`` holds samples of NAME (their voiceprints averaged). Samples as for
    ``POST /speakers``: 5-60 s of that one voice, any media ffmpeg reads."""
    from pipeline.audio import load_wav
    from pipeline.errors import InvalidMediaError
    from pipeline.media import extract_audio
    from pipeline.voiceprints import Voiceprint, mean_voiceprint, voice_of_sample

    if not folder.is_dir():
        raise InvalidMediaError(f"--speakers: {folder} is not a folder", code="SAMPLE_FOLDER")
    samples: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            samples.setdefault(path.name, []).extend(p for p in sorted(path.iterdir()) if p.is_file())
        elif path.is_file():
            samples.setdefault(path.stem, []).append(path)
    voices = []
    for name, paths in samples.items():
        vectors = []
        for path in paths:
            wav = tmp / f"sample-{uuid.uuid4().hex}.wav"
            try:
                extract_audio(path, wav, max_duration_s=600)
                vectors.append(voice_of_sample(pipeline, load_wav(wav)).vector)
            except InvalidMediaError as e:
                raise InvalidMediaError(f"voice sample {path.name}: {e.message}", code=e.code) from e
            finally:
                wav.unlink(missing_ok=True)
        voices.append(Voiceprint(f"file:{name}", name, mean_voiceprint(vectors)))
    if not voices:
        raise InvalidMediaError(f"--speakers: {folder} holds no voice sample", code="SAMPLE_FOLDER")
    return voices
def _check_vocabulary(prompt: str | None, hotwords: str | None) -> None:
    """options.prompt / options.hotwords checked by the rules the shim applies."""
    from pipeline.errors import UnsupportedOptionError
    from pipeline.vocabulary import vocabulary_problem

    problems = [p for p in (vocabulary_problem("prompt", prompt), vocabulary_problem("hotwords", hotwords)) if p]
    if problems:
        raise UnsupportedOptionError("; ".join(problems))
