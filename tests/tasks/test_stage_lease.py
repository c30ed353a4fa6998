"""The stage lease against a real Redis: one holder at a time, atomic renew and release (a holder
whose lease lapsed can neither extend nor delete the next holder's), and it lapses when its
holder stops renewing (a dead worker)."""

from __future__ import annotations

import uuid
from typing import Any

import redis

from tasks.lease import StageLease
from tests.helpers import wait_for, wait_for_renewals

# Short enough that outliving it takes seconds; long enough that the renewer thread (every TTL/3)
# is never so late, on a loaded machine, that a live lease lapses.
TTL_S = 3.0


class RacyRedis(redis.Redis):
    """Between reading a lease and acting on it, the lease lapses and another worker takes it: the
    interleaving that a check-then-act renew or release gets wrong."""

    race = True
    taken = False

    def get(self, name: Any) -> Any:
        value = super().get(name)
        if self.race and str(name).startswith("ecg:lease:"):
            super().set(name, "other-holder", px=30_000)
            self.taken = True
        return value


def test_one_holder_at_a_time(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    job = uuid.uuid4().hex[:8]
    with StageLease(r, job, "diarize") as a:
        assert a.held
        with StageLease(r, job, "diarize") as b:
            assert not b.held  # a live duplicate waits
        with StageLease(r, job, "transcribe") as other_stage:
            assert other_stage.held
    with StageLease(r, job, "diarize") as c:
        assert c.held  # released on exit


def test_release_never_deletes_another_holders_lease(redis_url: str) -> None:
    r = RacyRedis.from_url(redis_url, decode_responses=True)
    assert isinstance(r, RacyRedis)
    job = uuid.uuid4().hex[:8]
    lease = StageLease(r, job, "align")
    r.race = False
    lease.__enter__()
    assert lease.held
    r.race = True
    lease.__exit__(None, None, None)
    r.race = False
    if r.taken:  # a release that read the lease first: whoever took it meanwhile must keep it
        assert r.get(lease.key) == "other-holder"
    else:  # an atomic release: ours is gone, nothing else touched
        assert r.get(lease.key) is None


def test_lapsed_holder_does_not_extend_the_next_holders_lease(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    job = uuid.uuid4().hex[:8]
    lease = StageLease(r, job, "features", ttl_s=TTL_S)
    with lease:
        assert lease.held
        r.set(lease.key, "other-holder", px=60_000)  # lapsed and taken meanwhile
        wait_for(lease.lost.is_set, 60)  # the renewer finds out instead of extending it
        assert TTL_S * 1000 < r.pttl(lease.key) <= 60_000  # not set back to our TTL
    assert r.get(lease.key) == "other-holder"


def test_renewed_while_held_and_lapses_when_holder_dies(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    job = uuid.uuid4().hex[:8]
    lease = StageLease(r, job, "ingest", ttl_s=TTL_S)
    lease.__enter__()
    wait_for_renewals(r, lease.key, 4)  # renewed every TTL/3: held past its TTL, only renewal keeps it
    with StageLease(r, job, "ingest", ttl_s=TTL_S) as dup:
        assert not dup.held
    lease._stop.set()  # the holder dies: nobody renews
    wait_for(lambda: StageLease(r, job, "ingest", ttl_s=TTL_S).lock.acquire(blocking=False), 60)


def test_a_lease_that_lapsed_while_redis_was_away_is_taken_again(redis_url: str) -> None:
    """Redis unreachable for longer than the TTL (the key expired meanwhile): on its return the
    holder takes the free lease again instead of giving up the stage."""
    r = redis.Redis.from_url(redis_url)
    job = uuid.uuid4().hex[:8]
    lease = StageLease(r, job, "transcribe", ttl_s=TTL_S)
    with lease:
        r.delete(lease.key)  # what expiry during the outage leaves
        wait_for(lambda: r.exists(lease.key) == 1, 60)
        wait_for_renewals(r, lease.key, 2)  # and it keeps renewing it, as its own
        assert not lease.lost.is_set()
        with StageLease(r, job, "transcribe", ttl_s=TTL_S) as dup:
            assert not dup.held
