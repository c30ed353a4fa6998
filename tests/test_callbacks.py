"""Callbacks against a real HTTP receiver and a real Redis: order, signatures, retries."""

from __future__ import annotations

import time
import uuid

import httpx
import redis

from ecg_audio.callbacks import CallbackOutbox, DeliveryPolicy, Dispatcher, sign, verify_signature
from tests.conftest import Receiver

KEY = "k3y-for-tests"


def test_signature_roundtrip_and_tamper() -> None:
    body = b'{"a":1}'
    header = sign(KEY.encode(), int(time.time()), body)
    assert verify_signature(KEY, header, body)
    assert not verify_signature(KEY, header, body + b" ")
    assert not verify_signature("other", header, body)
    old = sign(KEY.encode(), int(time.time()) - 3600, body)
    assert not verify_signature(KEY, old, body)
    assert not verify_signature(KEY, "garbage", body)


def test_events_delivered_in_order_signed_and_final_once(redis_url: str) -> None:
    rcv = Receiver()
    try:
        box = CallbackOutbox(redis.Redis.from_url(redis_url), DeliveryPolicy(backoff_base_s=0.05), KEY)
        job = f"cb-{uuid.uuid4().hex[:8]}"
        for p in (10, 25, 40, 60):
            box.enqueue(job, rcv.url(), {"job_id": job, "status": "processing", "progress": p})
        first = box.enqueue(job, rcv.url(), {"job_id": job, "status": "completed", "progress": 100}, final=True)
        again = box.enqueue(job, rcv.url(), {"job_id": job, "status": "completed", "progress": 100}, final=True)
        assert first == f"{job}:final" and again is None
        with httpx.Client() as c:
            box.deliver_due(c)
        got = rcv.for_job(job)
        assert [e["progress"] for e in got] == [10, 25, 40, 60, 100]
        for h in rcv.headers:
            assert verify_signature(KEY, h["x-ecg-signature"], h["_body"].encode())
            assert h["x-ecg-event-id"]
        assert box.pending(job) == 0
    finally:
        rcv.close()


def test_receiver_down_then_back_gets_everything(redis_url: str) -> None:
    rcv = Receiver()
    rcv.fail_with = 503
    box = CallbackOutbox(redis.Redis.from_url(redis_url), DeliveryPolicy(backoff_base_s=0.05, backoff_max_s=0.3,
                                                                          max_attempts=100), KEY)
    job = f"cb-{uuid.uuid4().hex[:8]}"
    box.enqueue(job, rcv.url(), {"job_id": job, "progress": 10})
    box.enqueue(job, rcv.url(), {"job_id": job, "progress": 100, "status": "completed"}, final=True)
    d = Dispatcher(box, interval_s=0.05).start()
    try:
        time.sleep(1.0)
        assert rcv.for_job(job) == []
        rcv.fail_with = None
        deadline = time.monotonic() + 10
        while len(rcv.for_job(job)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        got = rcv.for_job(job)
        assert [e["progress"] for e in got] == [10, 100]
        assert got[-1]["event_id"] == f"{job}:final"
    finally:
        d.stop()
        rcv.close()


def test_permanent_rejection_does_not_block_later_events(redis_url: str) -> None:
    rcv = Receiver()
    try:
        rcv.fail_with = 410
        box = CallbackOutbox(redis.Redis.from_url(redis_url), DeliveryPolicy(backoff_base_s=0.01), None)
        job = f"cb-{uuid.uuid4().hex[:8]}"
        box.enqueue(job, rcv.url(), {"job_id": job, "progress": 10})
        with httpx.Client() as c:
            box.deliver_due(c)
        assert box.pending(job) == 0  # dead-lettered, not retried forever
    finally:
        rcv.close()
