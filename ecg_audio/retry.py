"""The one retry and backoff policy: how long a stage waits before it is tried again, and how often.

A stage is tried again for three reasons, each with its own row below and the same formula:
a network fault (a budget, then the job fails), a duplicate delivery waiting for the copy that
holds the stage's lease (no budget: it is not a fault), and Redis away while the stage keeps its
books (the message goes back to its queue after a pause, never in a hot loop).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Attempt ``n`` (from 1) waits ``first_s * 2**(n - 1)``, at most ``max_s``, times a random factor in
    ``[1 - jitter, 1]``: retries of many jobs hit by the same outage spread out instead of returning
    together. ``first_s == max_s`` with no jitter is a fixed pause."""

    first_s: float
    max_s: float
    jitter: float = 0.5

    def delay(self, attempt: int) -> float:
        cap = min(self.max_s, self.first_s * 2 ** max(0, attempt - 1))
        return cap * random.uniform(1.0 - self.jitter, 1.0) if self.jitter else cap


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries after the first, each after ``backoff.delay(attempt)``."""

    attempts: int
    backoff: Backoff

    def delay(self, attempt: int) -> float | None:
        """The wait before retry ``attempt`` (from 1), or None when the budget is spent."""
        return self.backoff.delay(attempt) if attempt <= self.attempts else None


# a retryable AnalysisError (a download that failed on the network, S3 throttling): 2, 4, 8 s (halved at
# random down to half), then the job fails with the error's code
NETWORK_RETRY = RetryPolicy(attempts=3, backoff=Backoff(first_s=2.0, max_s=60.0))
# the same stage of the job runs elsewhere (a redelivered duplicate): come back when its checkpoint
# will make this delivery a no-op
LEASE_WAIT = Backoff(first_s=5.0, max_s=5.0, jitter=0.0)
# Redis unreachable while a stage reads or writes its bookkeeping: pause before handing the message back
REDIS_AWAY = Backoff(first_s=2.0, max_s=2.0, jitter=0.0)
