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
from ecg_audio.stage_table import STAGE_NAMES
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
    prompt: str | None = None,
    hotwords: str | None = None,
    settings: Settings | None = None,
    registry: Any = None,
    on_progress: Callable[[str, int, str], None] | None = None,
    job_id: str | None = None,
) -> dict[str, Any]:
    """Analyze a local file or URL and return the job document ``{job_id, status, result}``."""
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
        t0 = time.perf_counter()
        for name in STAGE_NAMES:
            run_stage(name, job, env)
        envelope: dict[str, Any] = env.workspace(job.job_id).read_json("result.json")
        envelope["result"]["metadata"]["wall_time"] = round(time.perf_counter() - t0, 3)
        envelope["exports"] = {
            p.suffix.lstrip("."): p.read_text() for p in env.output_root.glob(f"{job.job_id}.*") if p.suffix != ".json"
        }
        from ecg_audio.messages import localize

        report("merge", 100, localize("Done", locale or s.default_locale))
        return envelope


def _check_vocabulary(prompt: str | None, hotwords: str | None) -> None:
    """options.prompt / options.hotwords checked by the rules the shim applies."""
    from pipeline.errors import UnsupportedOptionError
    from pipeline.vocabulary import vocabulary_problem

    problems = [p for p in (vocabulary_problem("prompt", prompt), vocabulary_problem("hotwords", hotwords)) if p]
    if problems:
        raise UnsupportedOptionError("; ".join(problems))
