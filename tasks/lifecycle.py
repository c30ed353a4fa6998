"""One delivery of one stage of one job, as the steps ``StageTask.run_stage_task`` takes, top-down:

1. **load**   the job from its record (URLs and options never travel in task arguments);
2. **guard**  a job already over stops its chain here; a merge redelivered after the result was
              stored only reports; the same stage running elsewhere (the lease) makes this delivery
              wait; a stage whose process died ``max_stage_deliveries`` times fails the job;
3. **run**    the stage body (``tasks.stages``), counted as a delivery until it returns or raises;
4. **record** what it did (runs, the audio's length), then publish the next stage in the Redis step
              that checks the lease (a duplicate, or a delivery whose lease was taken over, publishes
              nothing); merge reports the job complete;
5. **fail or retry**: Redis away → the message goes back to its queue; cancelled → the chain stops;
              a network fault → retried with backoff (``ecg_audio.retry``); anything else → the job
              fails with its code and final event.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import redis
import structlog
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError

from ecg_audio import keys
from ecg_audio.chain import next_stage_commands, publish_next
from ecg_audio.jobs import JobRecord, is_terminal
from ecg_audio.retry import LEASE_WAIT, NETWORK_RETRY, REDIS_AWAY
from ecg_audio.stage_table import STAGE_NAMES
from pipeline.errors import AnalysisError, CancelledError, ProcessingError, StageCrashedError, StageTimeoutError
from tasks import context, outcomes
from tasks.faults import maybe_crash
from tasks.lease import StageLease, lease_key
from tasks.progress import reporter
from tasks.stages import JobSpec, StageOutcome, run_stage

log = structlog.get_logger("ecg.tasks")

# KEYS: record, lease. ARGV: stage, the lease token of this delivery. A delivery is counted in
# 'deliveries:<stage>' under its lease token ('delivery:<stage>'); this takes it back (once).
_UNCOUNT_LUA = """
local field = 'delivery:' .. ARGV[1]
if redis.call('HGET', KEYS[1], field) ~= ARGV[2] then return 0 end
redis.call('HINCRBY', KEYS[1], 'deliveries:' .. ARGV[1], -1)
redis.call('HDEL', KEYS[1], field)
return 1
"""
# KEYS: record. ARGV: stage, lease token. The delivery returned or raised: taken back from the count.
_DELIVERED_LUA = """
local field = 'delivery:' .. ARGV[1]
redis.call('HINCRBY', KEYS[1], 'deliveries:' .. ARGV[1], -1)
if redis.call('HGET', KEYS[1], field) == ARGV[2] then redis.call('HDEL', KEYS[1], field) end
"""


def hand_back(client: Any, job_id: str, stage: str) -> bool:
    """The stage's process was stopped on purpose (a spot or lifecycle drain killed it and its message
    went back to the queue): its delivery is not one that crashed, so it is taken back from the count
    that fails a job with STAGE_CRASHED, and the lease it held is freed for the next delivery. Only the
    delivery that holds the lease now is taken back. True when one was."""
    key = lease_key(job_id, stage)
    token = client.get(key)
    uncounted = False
    if token is not None:
        uncounted = bool(client.eval(_UNCOUNT_LUA, 2, keys.job(job_id), key, stage, token))
    client.delete(key)  # its holder is dead
    return uncounted


class StageRun:
    """The steps above for ``stage`` of the job named in ``payload``, run by the bound Celery ``task``."""

    def __init__(self, task: Any, stage: str, payload: dict[str, Any]) -> None:
        self.task = task
        self.stage = stage
        self.payload = payload
        self.job_id = str(payload["job_id"])
        self.store = context.job_store()
        self.key = keys.job(self.job_id)
        self.rec: JobRecord | None = None
        self.job = JobSpec(job_id=self.job_id, source="")
        self.run_no: int | None = None  # the job's run (1, then one more per operator requeue)
        self.env: Any = None
        self.lease_id = ""  # the token of the stage's lease, once this delivery holds it

    # --- 1. load -------------------------------------------------------------------------------
    def load(self) -> None:
        self.rec = self.store.get(self.job_id)
        if self.rec is None:
            # no record (expired, or purged by an operator): nothing says what to run, nor whom to tell
            log.warning("chain_stopped_no_record")
            raise Ignore()
        self.job = JobSpec.from_request(self.job_id, self.rec.request)
        self.run_no = self.rec.run

    # --- 2. guard ------------------------------------------------------------------------------
    def guard(self) -> None:
        """Cancelled, failed elsewhere, or a duplicate delivery after completion: stop the chain."""
        if self.rec is not None and is_terminal(self.rec.status):
            outcomes.ensure_final(self.job_id, self.rec)
            log.info("chain_stopped", status=self.rec.status, error_code=self.rec.error_code)
            raise Ignore()
        self.env = context.stage_env(reporter(self.task, self.job))

    def already_merged(self) -> bool:
        """A redelivered merge after the result was stored: only the reporting is left."""
        return self.stage == "merge" and self.store.get_result(self.job_id) is not None

    @contextmanager
    def lease(self) -> Iterator[StageLease]:
        with StageLease(self.store.r, self.job_id, self.stage) as lease:
            if not lease.held:
                # the same stage of this job runs elsewhere (a redelivered duplicate): come back
                # later, when its checkpoint will make this a no-op
                log.info("stage_busy_elsewhere")
                raise self.task.retry(countdown=LEASE_WAIT.delay(1))
            token = lease.lock.local.token
            self.lease_id = token.decode() if isinstance(token, bytes) else str(token)
            yield lease

    def count_delivery(self) -> None:
        """Counted before any work, and taken back when the body returns or raises (``run``) or when a
        drain hands the stage back (``hand_back``): what is left counts the deliveries whose process
        died (a segfault, the OOM killer, a kill), so a stage that dies every time ends here instead of
        being delivered for ever."""
        pipe = self.store.r.pipeline()
        pipe.hincrby(self.key, f"deliveries:{self.stage}", 1)
        pipe.hset(self.key, mapping={f"started:{self.stage}": "1", f"delivery:{self.stage}": self.lease_id})
        deliveries = int(pipe.execute()[0])
        limit = context.settings().max_stage_deliveries
        if deliveries > limit:
            raise StageCrashedError(
                f"the {self.stage} stage was started {limit} times and its process died each time "
                "(killed, out of memory or crashed); giving up"
            )

    # --- 3. run --------------------------------------------------------------------------------
    def run(self) -> StageOutcome:
        self.count_delivery()
        try:
            maybe_crash(context.settings().fault_injection, self.stage, self.job_id, self.store.r)
            return run_stage(self.stage, self.job, self.env)
        except SoftTimeLimitExceeded as e:
            raise StageTimeoutError(f"the {self.stage} stage took longer than its time limit") from e
        finally:
            self.store.r.eval(_DELIVERED_LUA, 1, self.key, self.stage, self.lease_id)

    # --- 4. record -----------------------------------------------------------------------------
    def record(self, outcome: StageOutcome, lease: StageLease) -> None:
        if lease.lost.is_set():
            # another delivery took over this stage: it publishes the next stage, not us
            log.warning("stage_lease_lost_not_publishing")
            raise Ignore()
        if not outcome.skipped:
            # counted for operators and the chaos bench: a finished stage never runs twice
            self.store.r.hincrby(self.key, f"runs:{self.stage}", 1)
            if self.stage == "ingest":  # the audio's length, on the record: the shim's eta_s uses it
                duration = self.env.workspace(self.job_id).read_json("ingest.json")["duration"]
                self.store.update(self.job_id, duration=duration)
        elif self.next_started():
            # a duplicate delivery of a finished stage whose successor already runs (or ran):
            # publishing the next stage again would start a second copy of the rest of the chain
            log.info("duplicate_contained")
            raise Ignore()
        self.publish_next()

    def publish_next(self) -> None:
        """The next stage's message goes out in the Redis step that checks this delivery still holds
        the stage's lease (and that the next stage was neither published for this run nor started),
        instead of from Celery after the task returns, when the lease is already released: a copy
        restored while Redis was away, running beside this one, cannot publish it a second time."""
        i = STAGE_NAMES.index(self.stage)
        if i + 1 >= len(STAGE_NAMES):
            return
        commands = next_stage_commands(self.task.app, self.task.request, {"job_id": self.job_id})
        if not commands:  # no chain to continue (the task called directly)
            return
        rc = publish_next(
            self.store.r,
            commands,
            lease_key=lease_key(self.job_id, self.stage),
            token=self.lease_id,
            record_key=self.key,
            stage=self.stage,
            next_stage=STAGE_NAMES[i + 1],
        )
        self.task.request.chain = None  # published here, or by the delivery that holds the lease: not by Celery
        if rc == 0:
            log.warning("stage_lease_lost_not_publishing")
            raise Ignore()
        if rc == 2:
            log.info("duplicate_contained")
            raise Ignore()

    def next_started(self) -> bool:
        i = STAGE_NAMES.index(self.stage)
        if i + 1 >= len(STAGE_NAMES):
            return False
        return bool(self.store.r.hexists(self.key, f"started:{STAGE_NAMES[i + 1]}"))

    def complete(self) -> None:
        if self.stage == "merge":
            outcomes.complete(self.job, self.env, self.run_no)

    # --- 5. fail or retry ----------------------------------------------------------------------
    def fail_or_retry(self, e: Exception) -> NoReturn:
        """Called in the ``except`` block of the exception ``e`` that ended this delivery."""
        # kombu's OperationalError: the broker connection lost while the next stage is published
        if isinstance(e, redis.ConnectionError | redis.TimeoutError | OperationalError):
            # Redis away (a restart) while this stage reads or writes its bookkeeping: not the job's
            # fault, and failing it would need Redis anyway. The message goes back to its queue once
            # Redis answers; if even that fails it stays unacknowledged and worker.liveness restores
            # it. The checkpoint makes the next delivery resume where this one stopped.
            log.warning("stage_requeued_redis_unavailable", error=str(e))
            time.sleep(REDIS_AWAY.delay(1))
            raise Reject(str(e), requeue=True) from e
        if isinstance(e, CancelledError):
            # the record already says how the job ended (and its final event is out); the chain stops here
            log.info("stage_cancelled", reason=e.message)
            raise Ignore() from e
        if isinstance(e, AnalysisError):
            if e.retryable:
                self.retry_network_fault(e)
            outcomes.fail(self.job, self.stage, e, self.run_no)
            raise e
        log.exception("stage_crashed")
        err = ProcessingError(
            f"internal error in the {self.stage} stage ({type(e).__name__}); the team has the details"
        )
        outcomes.fail(self.job, self.stage, err, self.run_no)
        raise err from e

    def retry_network_fault(self, e: AnalysisError) -> None:
        """Raises Celery's Retry while the network budget lasts (counted per stage in the job record,
        not by Celery's one counter, which lease waits also advance); returns when it is spent."""
        tries = int(self.store.r.hincrby(self.key, f"netretries:{self.stage}", 1))
        countdown = NETWORK_RETRY.delay(tries)
        if countdown is not None:
            log.warning("stage_retry", code=e.code, error=e.message, retry=tries)
            raise self.task.retry(exc=e, countdown=countdown) from e
