"""Health: broker, workers, queue depth. Open (no API key), for load balancers and people."""

from __future__ import annotations

import redis
from fastapi import APIRouter

import celeryconfig
from api_shim.deps import ShimDep
from api_shim.schemas import Health

router = APIRouter(tags=["health"])


def queue_depth(
    r: redis.Redis, queues: tuple[str, ...] = (celeryconfig.MODEL_QUEUE, celeryconfig.CPU_QUEUE)
) -> dict[str, int]:
    """Messages waiting per queue, priority sub-queues included."""
    from ecg_audio.chain import queue_key

    pipe = r.pipeline()
    names: list[str] = []
    for q in queues:
        for p in celeryconfig.PRIORITY_STEPS:
            names.append(q)
            pipe.llen(queue_key(q, p))
    out: dict[str, int] = dict.fromkeys(queues, 0)
    for q, n in zip(names, pipe.execute(), strict=True):
        out[q] += int(n)
    return out


@router.get("/health", response_model=Health)
def health(shim: ShimDep) -> Health:
    r = shim.r
    try:
        r.ping()
        depth = queue_depth(r)
    except redis.RedisError:
        return Health(status="degraded", broker=False, workers=0, queue_depth={})
    try:
        workers = len(shim.celery.control.ping(timeout=0.5) or [])
    except Exception:
        workers = 0
    return Health(status="ok" if workers else "degraded", broker=True, workers=workers, queue_depth=depth)
