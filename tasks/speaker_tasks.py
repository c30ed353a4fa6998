"""Enrolling a voice from an uploaded sample: a small task on the model queue.

The shim never loads a model, so ``POST /speakers`` with a file stores the file as an upload
and sends this task, then waits for it (``ECG_SPEAKER_ENROLL_WAIT_S``; the task expires at the
same deadline, so a late worker does not enroll a voice nobody waits for). The worker decodes
the sample as ingest does, embeds it with the diarization's CAM++ model
(``pipeline.voiceprints.voice_of_sample``), writes the voiceprint to the library, and deletes
the sample and its workspace whatever happens: no audio of a voice is kept.

The task returns no voiceprint (the result backend would keep it): only the speaker's id, or
the error code and message the shim answers with.
"""

from __future__ import annotations

import uuid
from typing import Any

import structlog
from celery import shared_task

from ecg_audio.speakers import ENROLL_TASK, SpeakerLibrary
from pipeline.errors import AnalysisError, CancelledError
from tasks import context
from tasks.stages import JobSpec, StageEnv, stage_bodies

log = structlog.get_logger("ecg.speakers")


@shared_task(name=ENROLL_TASK, acks_late=False)
def enroll_speaker(request: dict[str, Any]) -> dict[str, Any]:
    """``request``: ``{owner, upload, name, speaker_id, add}``; ``add`` true: a sample for the
    existing speaker ``speaker_id``, else a new speaker with that id."""
    env = context.stage_env(lambda stage, progress, message: None)
    library = SpeakerLibrary(context.job_store().r)
    if not library.take_pending(str(request["speaker_id"])):
        # DELETE /speakers/{id} cancelled it while it waited for a worker, or it expired
        _delete_upload(env, str(request["upload"]))
        return {"error_code": CancelledError.code, "error_message": "the enrollment was cancelled"}
    job = JobSpec(job_id=f"enroll-{uuid.uuid4().hex}", source=str(request["upload"]))
    ws = env.workspace(job.job_id)
    try:
        vector, sample = _embed_sample(job, env, ws)
    except AnalysisError as e:
        log.info("speaker_sample_refused", code=e.code)
        return {"error_code": e.code, "error_message": e.message}
    finally:
        ws.remove()
        _delete_upload(env, str(request["upload"]))
    owner, speaker_id = str(request["owner"]), str(request["speaker_id"])
    if request.get("add"):
        rec = library.update(owner, speaker_id, add=(vector, sample))
        if rec is None:
            return {"error_code": "NOT_FOUND", "error_message": "no such speaker"}
    else:
        rec = library.create(owner, str(request["name"]), vector, sample, speaker_id=speaker_id)
    log.info("speaker_enrolled", speaker_id=rec.id, samples=len(rec.samples))
    return {"id": rec.id}


def _embed_sample(job: JobSpec, env: StageEnv, ws: Any) -> tuple[list[float], dict[str, Any]]:
    from pipeline.audio import load_wav
    from pipeline.voiceprints import voice_of_sample

    stage_bodies()["ingest"](job, env, ws)
    pipeline, _ = env.models.diarization()
    voice = voice_of_sample(pipeline, load_wav(ws.path("audio.wav")))
    return voice.vector, {"source": "upload", "duration": voice.duration, "speech": voice.speech}


def _delete_upload(env: StageEnv, url: str) -> None:
    from ecg_audio.uploads import s3_key, upload_id

    upload = upload_id(url)
    if upload is None:
        return
    try:
        if env.s3_bucket:
            env.s3().delete_object(Bucket=env.s3_bucket, Key=s3_key(upload))
        elif env.uploads_dir is not None:
            (env.uploads_dir / upload).unlink(missing_ok=True)
    except Exception as e:  # the sweep removes it later; the enrollment's answer does not depend on it
        log.warning("speaker_sample_not_deleted", error=type(e).__name__)
