"""Broker queues and kombu's Redis key naming, in one place (torch-free).

kombu's Redis transport keeps one list per queue and, with ``queue_order_strategy:
priority``, one list per priority step beside it: ``{queue}\\x06\\x16{step}`` (step 0 is the
queue's own list). The chain sender pushes to these lists itself and the shim and the
metrics publisher read their lengths, so the naming lives here once.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Any

from ecg_audio import keys

MODEL_QUEUE = "model"
CPU_QUEUE = "cpu"
QUEUES: tuple[str, ...] = (MODEL_QUEUE, CPU_QUEUE)

PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS: list[int] = list(range(10))
"""Every priority a message may carry gets its own list (kombu clamps priorities to 0..9)."""

WAITING_PREFIX = keys.WAITING
"""``ecg:waiting:{queue list}``: a sorted set of the jobs whose first message waits in that list,
scored by arrival (``WAITING_SEQ``). Submission adds a job in the script that pushes its message;
the event builder removes it when the record leaves ``queued``. A job's queue position is then a
``ZRANK`` (O(log n)) instead of a scan of the list (O(n), on every poll of a queued job)."""
WAITING_SEQ = keys.WAITING_SEQ


def waiting_key(list_key: str) -> str:
    return WAITING_PREFIX + list_key


def queue_key(queue: str, priority: int | None, steps: Sequence[int] = PRIORITY_STEPS) -> str:
    """The Redis list that kombu's Redis transport pushes a message of ``priority`` to."""
    if not priority:
        return queue
    p = max(0, min(9, int(priority)))  # kombu clamps to 0..9
    ordered = sorted(steps)
    step = ordered[bisect.bisect(ordered, p) - 1]
    return f"{queue}{PRIORITY_SEP}{step}" if step else queue


def priority_queue_keys(queue: str, steps: Iterable[int] = PRIORITY_STEPS, key_prefix: str = "") -> list[str]:
    """Every Redis list that holds messages of ``queue``: its own and one per priority step."""
    return [f"{key_prefix}{queue}{PRIORITY_SEP}{p}" if p else f"{key_prefix}{queue}" for p in steps]


def queue_depth(r: Any, queues: Iterable[str] = QUEUES, key_prefix: str = "") -> dict[str, int]:
    """Messages waiting per queue, priority sub-queues included (one round trip)."""
    names = list(queues)
    pipe = r.pipeline(transaction=False)
    for q in names:
        for key in priority_queue_keys(q, key_prefix=key_prefix):
            pipe.llen(key)
    counts = pipe.execute()
    per = len(PRIORITY_STEPS)
    return {q: int(sum(counts[i * per : (i + 1) * per])) for i, q in enumerate(names)}
