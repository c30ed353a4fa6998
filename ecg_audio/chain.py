"""The job chain by task *names*: what the shim and the operator commands send.

Torch-free and task-free: the shim builds signatures from names in
``celeryconfig.CHAIN``, so it never imports the stage code.
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import Celery, chain

import celeryconfig


def job_payload(
    job_id: str,
    source: str,
    *,
    language: str | None = None,
    callback_url: str | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "source": source,
        "language": language,
        "callback_url": callback_url,
        "options": dict(options or {}),
    }


def send_chain(app: Celery, payload: dict[str, Any], *, priority: int | None = None) -> str:
    """Enqueue ingest → … → merge for a job; returns the first task's id.

    Task ids are ``{job_id}:{stage}:{nonce}`` so that an operator can find a job's
    tasks in Flower and in the result backend.
    """
    nonce = uuid.uuid4().hex[:8]
    sigs = []
    for i, name in enumerate(celeryconfig.CHAIN):
        stage = name.split(".", 1)[1]
        opts: dict[str, Any] = {
            "queue": celeryconfig.TASK_QUEUES[name],
            "task_id": f"{payload['job_id']}:{stage}:{nonce}",
        }
        if priority is not None:
            opts["priority"] = priority
        # only the job id travels: stages read the request from the job record, so URLs (and any
        # token in them) stay out of messages, results and their logs
        sigs.append(app.signature(name, args=({"job_id": payload["job_id"]},) if i == 0 else (), **opts))
    chain(*sigs).apply_async()
    return str(sigs[0].id)
