"""Health: open (no API key), for load balancers, orchestrators and people.

* ``/health``: broker, workers, queue depth (cached a few seconds: ``api_shim.probes``);
* ``/health/live``: the process answers (restart it when this fails);
* ``/health/ready``: it can accept jobs, i.e. the broker answers (503 otherwise: route traffic elsewhere).
"""

from __future__ import annotations

from typing import Literal

import redis
from fastapi import APIRouter
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api_shim.deps import ShimDep
from api_shim.errors import UNAVAILABLE, ApiError
from api_shim.schemas import Health

router = APIRouter(tags=["health"])


class Probe(BaseModel):
    status: Literal["ok"]


@router.get("/health", response_model=Health)
async def health(shim: ShimDep) -> Health:
    # async, and a thread only to refresh: a flood of cached answers costs no thread-pool slot
    report = shim.health.fresh()
    return report if report is not None else await run_in_threadpool(shim.health.refresh)


@router.get("/health/live", response_model=Probe)
async def live() -> Probe:
    return Probe(status="ok")


@router.get("/health/ready", response_model=Probe, responses=UNAVAILABLE)
async def ready(shim: ShimDep) -> Probe:
    try:
        await shim.async_store().r.ping()
    except (redis.RedisError, OSError) as e:
        raise ApiError(503, "BROKER_UNAVAILABLE", "the broker (Redis) does not answer: jobs cannot be accepted") from e
    return Probe(status="ok")
