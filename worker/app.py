"""The Celery application of a worker machine.

Start it with ``celery -A worker.app worker -Q model,cpu --concurrency 1``. Importing this module
builds the app and registers the stage tasks, nothing more: secrets, logging, models and the
worker's hooks are set up by ``worker.boot`` when the app first reads its configuration.
"""

from __future__ import annotations

from celery import Celery

from worker.boot import configure

app = Celery("ecg")
app.on_configure.connect(configure)
app.config_from_object("celeryconfig")
app.autodiscover_tasks(["tasks"], related_name="pipeline_tasks", force=True)
