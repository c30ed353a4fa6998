"""Every Redis key name and prefix the fleet writes, in one place.

A prefix ends with ``:`` and is followed by an id (a job id, a worker id, an API key's
fingerprint). Redis runs ``noeviction``: whoever writes a key here also bounds it (TTL or trim).
"""

from __future__ import annotations

# a job: its record (hash), its result (JSON), its event log (stream: JOB + id + EVENTS_SUFFIX)
JOB = "ecg:job:"
EVENTS_SUFFIX = ":events"
RESULT = "ecg:result:"
# indexes over jobs (sorted sets, scored by time)
JOBS_ALL = "ecg:jobs:all"
JOBS_FAILED = "ecg:jobs:failed"  # the dead-letter index
JOBS_OWNER = "ecg:jobs:owner:"  # per API key fingerprint
# hash: job id -> the last run of a purged job with that id (a few bytes per purged id: all that
# purge keeps, so that a job re-created under the id never reuses an event id of the earlier one)
JOBS_RETIRED_RUNS = "ecg:jobs:retired_runs"
# a stage run's lease and the fault-injection counters (tests and chaos)
LEASE = "ecg:lease:"
FAULT = "ecg:fault:"
# callbacks: per-job outbox (list), due-time index, delivery locks, counters, dead letters
CALLBACK_QUEUE = "ecg:cb:q:"
CALLBACK_DUE = "ecg:cb:due"
CALLBACK_LOCK = "ecg:cb:lock:"
CALLBACK_DELIVERED = "ecg:cb:delivered"
CALLBACK_DEAD = "ecg:cb:dead:"
# each API key's webhook secret generations (hash: no secret, ecg_audio/webhook_secrets.py)
WEBHOOK_SECRET_GENERATIONS = "ecg:whsec:"  # noqa: S105  # nosec B105  (a key name, not a secret)
# worker liveness
WORKERS = "ecg:workers:ids"
WORKER_HEARTBEAT = "ecg:workers:hb:"
WORKER_INFLIGHT = "ecg:inflight:"
WORKERS_REAPER_LOCK = "ecg:workers:reaper"
WORKERS_RESTORED = "ecg:workers:restored"
WORKERS_ORPHANS_RESTORED = "ecg:workers:orphans_restored"
# the shim's per-key limits
LIMIT_RATE = "ecg:limit:rate:"
LIMIT_QUEUED = "ecg:limit:queued:"
# the jobs waiting in each queue list, in arrival order (sorted sets; ecg_audio.queues), and the counter
# that scores them
WAITING = "ecg:waiting:"
WAITING_SEQ = "ecg:waiting:seq"
# the speaker library: a speaker (hash), each API key's speakers (set), the voiceprints of a finished
# job's labels (hash), an enrollment waiting for a worker (ecg_audio/speakers.py)
SPEAKER = "ecg:speaker:"
SPEAKERS_OWNER = "ecg:speakers:"
JOB_VOICES = "ecg:job-voices:"
SPEAKER_PENDING = "ecg:speaker-pending:"
# the event streams each API key holds open (sorted sets of leases; api_shim/stream_slots.py)
STREAMS = "ecg:streams:"
# live transcription (WS /v1/stream; ecg_audio/live.py): the stream workers (set), each one's heartbeat
# (a string with a short TTL: its slot count), the live streams it holds (set), its start queue (list);
# per live stream its audio in and its messages out (Redis streams); per job the live finals (JSON)
LIVE_WORKERS = "ecg:live:workers"
LIVE_HEARTBEAT = "ecg:live:hb:"
LIVE_BUSY = "ecg:live:busy:"
LIVE_START = "ecg:live:start:"
LIVE_AUDIO = "ecg:live:audio:"
LIVE_OUT = "ecg:live:out:"
LIVE_RESULT = "ecg:live:result:"
LIVE_PER_KEY = "ecg:live:perkey:"  # + key fingerprint: a zset of the live streams one API key holds (leases)
LIVE_VIEW = "ecg:live:view:"  # + stream id: who may watch the running stream on its job page (JSON, a lease)

# + instance id: the processes of one instance that hold work (a set of roles: the Celery worker,
# the stream worker), the protection last set for it (":state") and the lock around both (":lock")
PROTECTION = "ecg:protection:"


def job(job_id: str) -> str:
    return JOB + job_id


def events(job_id: str) -> str:
    return JOB + job_id + EVENTS_SUFFIX


def result(job_id: str) -> str:
    return RESULT + job_id
