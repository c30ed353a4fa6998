"""Job records against a real Redis: idempotent creation, forward-only progress, final states."""

from __future__ import annotations

import uuid

import pytest

from ecg_audio.jobs import JobStore


@pytest.fixture()
def store(redis_url: str) -> JobStore:
    return JobStore.from_url(redis_url, ttl_s=600)


def jid() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def test_create_is_idempotent(store: JobStore) -> None:
    j = jid()
    assert store.create(j, {"video_url": "a"})
    assert not store.create(j, {"video_url": "b"})
    rec = store.get(j)
    assert rec is not None and rec.status == "queued" and rec.request == {"video_url": "a"}


def test_progress_never_goes_back(store: JobStore) -> None:
    j = jid()
    store.create(j, {})
    store.update(j, status="processing", progress=40, stage="diarize", message="Speakers found")
    store.update(j, status="processing", progress=25, stage="diarize", message="late VAD report")
    rec = store.get(j)
    assert rec is not None and rec.progress == 40


def test_finished_job_stays_finished(store: JobStore) -> None:
    j = jid()
    store.create(j, {})
    assert store.update(j, status="completed", progress=100)
    assert not store.update(j, status="processing", progress=50)
    assert not store.mark_failed(j, "PROCESSING_ERROR", "late failure", "merge")
    rec = store.get(j)
    assert rec is not None and rec.status == "completed" and rec.error_code is None


def test_failed_jobs_are_listed_and_requeue_clears_error(store: JobStore) -> None:
    j = jid()
    store.create(j, {})
    assert store.mark_failed(j, "DOWNLOAD_ERROR", "404", "ingest")
    assert j in store.failed_ids()
    assert store.requeue(j)
    rec = store.get(j)
    assert rec is not None and rec.status == "queued" and rec.error_code is None
    assert j not in store.failed_ids()


def test_unknown_job(store: JobStore) -> None:
    assert store.get("nope-" + uuid.uuid4().hex) is None
    assert not store.update("nope-" + uuid.uuid4().hex, progress=10)


def test_job_indexes_drop_entries_older_than_the_records(store: JobStore) -> None:
    """Redis runs noeviction: the all-jobs index and the dead-letter (failed) index must not grow for
    ever. Entries older than the record TTL go when new ones are added."""
    import time

    old = time.time() - store.ttl_s - 60
    store.r.zadd("ecg:jobs:all", {"ancient-job": old})
    store.r.zadd("ecg:jobs:failed", {"ancient-failure": old})
    j = jid()
    store.create(j, {})
    assert store.r.zscore("ecg:jobs:all", "ancient-job") is None
    assert store.r.zscore("ecg:jobs:all", j) is not None
    assert store.mark_failed(j, "PROCESSING_ERROR", "boom", "ingest")
    assert store.r.zscore("ecg:jobs:failed", "ancient-failure") is None
    assert j in store.failed_ids(1000)
