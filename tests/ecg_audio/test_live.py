"""The Redis side of live streams (``ecg_audio.live``): slot claims, heartbeats, cleanup."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio

from ecg_audio import keys, live


def _claim(url: str, stream_id: str) -> str | None:
    async def go() -> str | None:
        r = redis.asyncio.Redis.from_url(url, decode_responses=True)
        try:
            return await live.claim_slot(r, stream_id)
        finally:
            await r.aclose()

    return asyncio.run(go())


def test_a_stream_goes_to_the_worker_with_most_free_slots_and_none_past_the_last(
    redis_client: Any, scratch_redis_url: str
) -> None:
    live.heartbeat(redis_client, "w1", 1)
    live.heartbeat(redis_client, "w2", 2)
    assert _claim(scratch_redis_url, "s1") == "w2"
    assert {_claim(scratch_redis_url, "s2"), _claim(scratch_redis_url, "s3")} == {"w1", "w2"}
    assert live.slot_counts(redis_client) == (3, 0)
    assert _claim(scratch_redis_url, "s4") is None
    live.release(redis_client, "w2", "s1")
    assert live.slot_counts(redis_client) == (2, 1) and _claim(scratch_redis_url, "s4") == "w2"


def test_a_worker_whose_heartbeat_lapsed_is_forgotten_with_its_streams(
    redis_client: Any, scratch_redis_url: str
) -> None:
    live.heartbeat(redis_client, "dead", 4)
    assert _claim(scratch_redis_url, "s1") == "dead"
    redis_client.delete(live.heartbeat_key("dead"))  # what its TTL does when it stops renewing
    assert _claim(scratch_redis_url, "s2") is None
    assert not redis_client.sismember(keys.LIVE_WORKERS, "dead") and not redis_client.exists(live.busy_key("dead"))
    assert redis_client.pttl(live.heartbeat_key("w")) == -2  # no key without its TTL: a live one has it
    live.heartbeat(redis_client, "w", 1)
    assert 0 < redis_client.pttl(live.heartbeat_key("w")) <= live.HEARTBEAT_TTL_MS


def test_a_worker_that_leaves_takes_everything_of_its_own(redis_client: Any, scratch_redis_url: str) -> None:
    live.heartbeat(redis_client, "w", 2)
    assert _claim(scratch_redis_url, "s1") == "w"
    live.leave(redis_client, "w")
    assert live.slot_counts(redis_client) == (0, 0)
    assert not [k for k in redis_client.keys("*") if b":w" in k]
