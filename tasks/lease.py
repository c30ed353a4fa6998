"""The stage lease: at most one run of a given job's stage at a time, across workers."""

from __future__ import annotations

import threading
from typing import Any

import structlog
from redis.exceptions import LockNotOwnedError

from ecg_audio import keys

log = structlog.get_logger("ecg.tasks")

LEASE_TTL_S = 30.0


def lease_key(job_id: str, stage: str) -> str:
    return f"{keys.LEASE}{job_id}:{stage}"


class StageLease:
    """At most one run of a given job's stage at a time, across workers.

    A redis-py ``Lock`` (token-checked acquire, extend and release, each one atomic Redis
    script) with a short TTL, renewed by a thread while the stage runs: a worker that dies stops
    renewing, so its lease lapses within ``ttl_s`` and a redelivered copy can take over, while a
    live duplicate is kept waiting. A holder whose lease lapsed (a stalled process) finds ``lost``
    set instead of extending or releasing someone else's.
    """

    def __init__(self, client: Any, job_id: str, stage: str, *, ttl_s: float = LEASE_TTL_S) -> None:
        self.key = lease_key(job_id, stage)
        self.ttl_s = ttl_s
        self.lock = client.lock(self.key, timeout=ttl_s, blocking=False, thread_local=False)
        self.held = False
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StageLease:
        self.held = bool(self.lock.acquire(blocking=False))
        if self.held:
            self._thread = threading.Thread(target=self._renew, name="ecg-lease", daemon=True)
            self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.lock.reacquire()
            except LockNotOwnedError:
                # lapsed: while Redis was unreachable for longer than the TTL, or this process stalled.
                # Free: take it again, with the same token. Held by another: it is theirs now.
                try:
                    if self.lock.acquire(blocking=False, token=self.lock.local.token):
                        log.warning("lease_reacquired_after_lapse", key=self.key)
                        continue
                except Exception as e:  # Redis still away: try again next round
                    log.warning("lease_renew_failed", key=self.key, error=str(e))
                    continue
                self.lost.set()
                log.warning("lease_lost", key=self.key)
                return
            except Exception:  # a Redis hiccup: the next round tries again
                log.warning("lease_renew_failed", key=self.key)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.held:
            try:
                self.lock.release()
            except LockNotOwnedError:
                self.lost.set()
                log.warning("lease_lost", key=self.key)
            except Exception:
                log.warning("lease_release_failed", key=self.key)
