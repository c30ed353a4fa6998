"""The per-job event log on a real Redis: order, resume after an event id, once-only final."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable

import redis
import redis.asyncio

from ecg_audio import event_log


def _job() -> str:
    return f"log-{uuid.uuid4().hex[:8]}"


def _progress(job_id: str, p: int) -> dict[str, object]:
    return {"job_id": job_id, "status": "processing", "progress": p}


def test_append_orders_events_and_refuses_repeats(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    job = _job()
    ids = [event_log.new_event_id(job) for _ in range(3)]
    for i, eid in enumerate(ids):
        assert event_log.append(r, job, eid, _progress(job, 10 * (i + 1)), ttl_s=600)
    assert event_log.append(r, job, ids[-1], _progress(job, 30)) is None  # a redelivered report
    final = event_log.new_event_id(job, final=True)
    assert final == f"{job}:final"
    assert event_log.append(r, job, final, {"job_id": job, "status": "completed", "progress": 100})
    assert event_log.append(r, job, final, {"job_id": job, "status": "completed"}) is None  # final once
    events = event_log.read_all(r, job)
    assert [e.event_id for e in events] == [*ids, final]
    assert [e.payload["event_id"] for e in events] == [*ids, final]  # the callback body carries its id
    assert [e.payload.get("progress") for e in events] == [10, 20, 30, 100]
    assert events[-1].final and not any(e.final for e in events[:-1])
    assert 0 < int(r.ttl(event_log.key(job))) <= DEFAULT_TTL


DEFAULT_TTL = event_log.DEFAULT_TTL_S


def test_append_in_a_pipeline(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    job = _job()
    pipe = r.pipeline()
    pipe.set(f"unrelated:{job}", "1", ex=60)
    event_log.append(pipe, job, f"{job}:a", _progress(job, 10))
    event_log.append(pipe, job, f"{job}:a", _progress(job, 10))
    _, first, repeat = pipe.execute()
    assert first and repeat is None
    assert [e.event_id for e in event_log.read_all(r, job)] == [f"{job}:a"]


async def _follow(
    redis_url: str, job: str, last_event_id: str | None = None, on_idle: Callable[[list[str]], None] | None = None
) -> list[str | None]:
    """The job's events as the shim's streams follow them (``EventHub``): ids, ``None`` for each quiet
    0.2 s (``on_idle`` is called then with the ids so far), until the final event."""
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    sub = await event_log.EventHub(client, block_ms=100).subscribe(job, last_event_id=last_event_id)
    got: list[str | None] = []
    try:
        async for ev in sub.events(idle_s=0.2):
            got.append(None if ev is None else ev.event_id)
            if ev is None and on_idle is not None:
                on_idle([g for g in got if g is not None])
    finally:
        sub.close()
        await client.aclose()
    return got


def test_follow_resumes_after_last_event_id_and_waits_for_new_events(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    job = _job()
    for p in (10, 25):
        event_log.append(r, job, f"{job}:p{p}", _progress(job, p))

    def later() -> None:
        w = redis.Redis.from_url(redis_url, decode_responses=True)
        for p in (40, 60):
            event_log.append(w, job, f"{job}:p{p}", _progress(job, p))
        event_log.append(w, job, f"{job}:final", {"job_id": job, "status": "completed"})

    writer = threading.Thread(target=later)

    def start_writer(seen: list[str]) -> None:
        if writer.ident is None:  # the backlog is out and the follower waits: now the new events
            assert seen == [f"{job}:p25"]
            writer.start()

    seen = [g for g in asyncio.run(_follow(redis_url, job, f"{job}:p10", start_writer)) if g is not None]
    writer.join()
    assert seen == [f"{job}:p25", f"{job}:p40", f"{job}:p60", f"{job}:final"]
    # an unknown id (trimmed away) replays the whole log: nothing is missed
    replay = [g for g in asyncio.run(_follow(redis_url, job, "nope")) if g is not None]
    assert replay == [f"{job}:p10", *seen]


def test_follower_blocks_without_a_thread(redis_url: str) -> None:
    job = _job()

    async def main() -> list[str | None]:
        r = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)

        async def write() -> None:
            await asyncio.sleep(0.3)
            await event_log.append(r, job, f"{job}:a", {})  # on an asyncio client it returns an awaitable
            await event_log.append(r, job, f"{job}:final", {})

        task = asyncio.create_task(write())
        got = await _follow(redis_url, job)
        await task
        await r.aclose()
        return got

    got = asyncio.run(main())
    assert [g for g in got if g is not None] == [f"{job}:a", f"{job}:final"]
    assert got[0] is None  # it waited (keep-alive ticks) before the first event


def test_a_requeued_run_follows_the_earlier_final_event(redis_url: str) -> None:
    """Final ids ``{job}:final:{run}`` (the event builder's, after an operator requeue): a reader passes
    an earlier run's final event and stops at the last one; resuming after run 1's final gets run 2."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    job = _job()
    run1 = [f"{job}:a", f"{job}:final:1"]
    run2 = [f"{job}:b", f"{job}:final:2"]
    for eid in run1 + run2:
        assert event_log.append(r, job, eid, {"job_id": job})
    assert all(event_log.is_final(e) for e in (f"{job}:final", f"{job}:final:1", f"{job}:final:12"))
    assert not event_log.is_final(f"{job}:finalize")
    assert [e for e in asyncio.run(_follow(redis_url, job)) if e] == run1 + run2
    assert [e for e in asyncio.run(_follow(redis_url, job, run1[-1])) if e] == run2
