"""Decoding batches side by side on a CPU: how many at once, how they are cut, how they run.

CTranslate2 releases the GIL while it computes, and a model loaded with ``num_workers=N``
(its ``inter_threads``) runs N calls from N Python threads at once, each on its own
``cpu_threads``. The transcription and the language identification cut their work into
batches of even size (``even_batches``) and hand them to ``parallel_map``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T_in = TypeVar("T_in")
T_out = TypeVar("T_out")


def decode_streams(device: str, threads: int) -> int:
    """How many batches a model decodes at once, each on ``threads // streams`` threads.

    On a CPU, two batches side by side on one thread each decode in 0.68 of the time that
    one batch after the other takes on two threads (tiny.en, 16 chunks, beam 5; 0.75 with
    AVX2 kernels): a decoding step's matrices are small, and two threads on one of them wait
    on each other. A GPU runs one batch at a time."""
    return 2 if device == "cpu" and threads >= 2 else 1


def model_streams(*models: Any) -> int:
    """The most batches any of these models decodes at once (``decode_streams``)."""
    return max((int(getattr(m, "ecg_parallel", 1) or 1) for m in models if m is not None), default=1)


def parallel_map(streams: int, fn: Callable[[T_in], T_out], items: Sequence[T_in]) -> Iterator[T_out]:
    """``fn(x)`` for each of ``items``, up to ``streams`` at once (CTranslate2 releases the GIL
    while it computes), yielded in order as they are ready."""
    if streams <= 1 or len(items) <= 1:
        yield from (fn(x) for x in items)
        return
    with ThreadPoolExecutor(max_workers=streams, thread_name_prefix="ecg-decode") as pool:
        yield from pool.map(fn, items)


def even_batches(n: int, batch_size: int, streams: int = 1) -> list[range]:
    """``range(n)`` in consecutive batches of at most ``batch_size``, as even as they can be,
    and as many as a multiple of ``streams`` where there are pieces enough (the batches that
    run side by side then finish together)."""
    if n <= 0:
        return []
    k = math.ceil(n / max(1, batch_size))
    if streams > 1:
        k = min(n, math.ceil(k / streams) * streams)
    size = math.ceil(n / k)
    return [range(a, min(n, a + size)) for a in range(0, n, size)]
