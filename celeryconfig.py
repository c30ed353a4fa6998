"""Celery settings for long GPU jobs on Redis. Shared by the workers and the shim.

Each setting says why it is set: a job that was accepted must end, exactly
once, with a result or a clear error, whatever happens to a worker.
"""

from __future__ import annotations

from kombu import Exchange, Queue

from ecg_audio.queues import CPU_QUEUE, MODEL_QUEUE, PRIORITY_STEPS, QUEUES
from ecg_audio.settings import get_settings
from ecg_audio.speakers import ENROLL_TASK
from ecg_audio.stage_table import STAGES

_s = get_settings()

# The chain, each task's queue and its time limits come from the stage table
# (ecg_audio/stage_table.py): one row per stage. Model stages hold the GPU; ingest/features/merge
# are CPU and I/O work that can run beside them on a separate worker so the GPU never waits.
# enrolling a voice sample needs the diarization's model (tasks/speaker_tasks.py)
TASK_QUEUES = {s.task_name: s.queue for s in STAGES} | {"ecg.worker_info": MODEL_QUEUE, ENROLL_TASK: MODEL_QUEUE}
CHAIN = [s.task_name for s in STAGES]

# Hard time limit per stage (seconds); the soft limit fires first so the stage can
# fail with TIMEOUT_ERROR and a message instead of being killed.
STAGE_TIME_LIMITS = {s.task_name: s.hard_limit_s for s in STAGES}
LONGEST_HARD_LIMIT = max(STAGE_TIME_LIMITS.values())

broker_url = _s.redis_url
result_backend = _s.redis_url

# The Redis transport redelivers a message that was taken but not acknowledged
# after visibility_timeout. It must be longer than the longest stage, or a slow
# but healthy stage would be handed to a second worker and run twice. The shim
# shares the broker, so it reads this same module.
broker_transport_options = {
    "visibility_timeout": LONGEST_HARD_LIMIT + 1800,
    "queue_order_strategy": "priority",
    "priority_steps": PRIORITY_STEPS,
}
result_backend_transport_options = {"visibility_timeout": LONGEST_HARD_LIMIT + 1800}
broker_connection_retry_on_startup = True

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]

# Acknowledge after the stage finishes, not before: a worker that dies mid-stage
# leaves the message unacknowledged and it is delivered again (stages are
# checkpointed, so the redelivery resumes instead of redoing finished work).
task_acks_late = True
# ... and when the worker process is killed (SIGKILL, OOM killer), reject the
# message so it is requeued at once rather than after the visibility timeout.
task_reject_on_worker_lost = True
# One GPU, one job: never reserve a second message while one runs, or a long
# job would hold another job hostage in this worker's buffer.
worker_prefetch_multiplier = 1
# If the broker connection drops, the running stage carries on: a short Redis restart
# must not cost the work done (nor a model reload). Cancelling it (True) left its message
# unacknowledged with nobody to restore it: the job waited the visibility timeout (hours).
# The stage's lease keeps any second copy waiting; its progress reports skip while Redis
# is away; if its acknowledgement is lost with the old connection, worker.liveness finds
# the message orphaned (held by nobody, never acknowledged) and restores it, and the
# redelivered copy stops at the checkpoint without publishing the next stage again.
worker_cancel_long_running_tasks_on_connection_loss = False
# Model loading happens in worker_process_init and takes tens of seconds; the
# default 4 s would kill the child before it is ready.
worker_proc_alive_timeout = 600.0
worker_hijack_root_logger = False
# our JSON logs go to the real stderr; Celery must not swallow prints into its logger either
worker_redirect_stdouts = False
worker_send_task_events = True  # Flower shows tasks live
task_send_sent_event = True
task_track_started = True
# Celery's per-task results expire with the job records.
result_expires = _s.job_ttl_s

task_queues = tuple(Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES)
task_default_queue = CPU_QUEUE
# A typo in a queue name must fail loudly, not create a queue nobody consumes.
task_create_missing_queues = False
task_routes = {name: {"queue": q} for name, q in TASK_QUEUES.items()}
task_annotations = {
    name: {"time_limit": hard, "soft_time_limit": max(60, int(hard * 0.95))} for name, hard in STAGE_TIME_LIMITS.items()
}
