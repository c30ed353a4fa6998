"""The stream worker: a process type beside the Celery stage workers, serving live streams.

``python -m worker.stream`` (or ``ecg-audio stream-worker``) loads the live models once
(``load_stream_models``: tiny.en, Whisper base, CAM++), then serves ``ECG_STREAM_SLOTS`` streams
at once, one thread each; the shim reaches it only through Redis (``ecg_audio.live``), so the
two may run on different machines. A heartbeat thread renews the worker's heartbeat key every
second; when the process dies the key expires within ``HEARTBEAT_TTL_MS`` and the shim tells
each of its clients (``STREAM_WORKER_LOST``). SIGTERM stops taking streams, finishes none:
the streams it held are told the same way, at once (``leave``).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from typing import Any

import numpy as np
import redis
import structlog

from ecg_audio import live
from ecg_audio.settings import Settings, offline_model_env
from pipeline.errors import AnalysisError, ProcessingError, UnsupportedOptionError

log = structlog.get_logger("ecg.stream")

READ_BLOCK_MS = 200  # how long a slot waits for audio before looking at its deadlines again


def load_stream_models(settings: Settings) -> Any:
    """The models of every stream, loaded once: ``pipeline.streaming.asr.StreamModels``."""
    from ecg_audio.languages import is_english_only
    from pipeline.asr_models import resolve_asr_model
    from pipeline.streaming.asr import StreamModels, load_whisper
    from pipeline.streaming.speakers import load_embedder, load_segmenter
    from worker.cpu import auto_compute_type, configure_torch_threads, cpu_threads

    threads = cpu_threads(settings.cpu_threads)
    configure_torch_threads(threads)
    device = settings.resolved_device()
    compute = settings.compute_type if settings.compute_type != "auto" else auto_compute_type(device)

    def whisper(name: str) -> Any:
        path = resolve_asr_model(name, settings.model_cache_dir)
        return load_whisper(path, compute_type=compute, threads=threads, device=device)

    main = whisper(settings.asr_model)
    multi_name = settings.asr_multilingual_model
    if is_english_only(settings.asr_model):
        multilingual = whisper(multi_name) if multi_name else None
        english = main
    else:
        english, multilingual = None, main
    embed = load_embedder(runtime=settings.diarization_runtime, onnx_cache_dir=settings.onnx_cache_dir)
    segmenter = load_segmenter(runtime=settings.diarization_runtime, onnx_cache_dir=settings.onnx_cache_dir)
    models = StreamModels(english=english, multilingual=multilingual, embed=embed, segment=segmenter)
    warm_up(models)
    return models


def warm_up(models: Any) -> None:
    """One pass of every model on a few seconds of noise: their first call builds kernels and
    caches (seconds on a CPU), which would otherwise land on the first stream's first finals."""
    noise = np.random.default_rng(0).normal(0, 0.01, 3 * 16000).astype(np.float32)
    for backend in (models.english, models.multilingual):
        if backend is not None:
            backend.transcribe(noise, prompt="", language="en")
    if models.multilingual is not None:
        models.multilingual.detect_language(noise)
    models.embed(noise, models.segment(noise)[:, 0] + 1.0)


def pcm_to_float(pcm: bytes) -> np.ndarray:
    """pcm_s16le bytes (an even count) as float32 in [-1, 1]."""
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def serve_stream(r: redis.Redis, models: Any, request: live.StartRequest, *, max_s: float, idle_s: float) -> None:
    """One stream, from its first audio to ``done``: the session fed with what arrived since the
    last decoding (all of it at once: a stream that fell behind catches up in one decoding). A
    stream longer than ``max_s``, or with no audio for ``idle_s`` (its client went silent, or its
    shim died), ends as if stopped: its client still gets every final and its job."""
    from pipeline.streaming import LiveOptions, LiveSession

    sid = request.stream_id
    if request.sample_rate != 16000:
        raise UnsupportedOptionError(f"sample_rate {request.sample_rate}: this stream worker takes 16000 only")
    session = LiveSession(
        models,
        LiveOptions(language=request.language, num_speakers=request.num_speakers, max_speakers=request.max_speakers),
    )
    last_id, rest, heard = "0-0", b"", time.monotonic()
    while True:
        reply: Any = r.xread({live.audio_key(sid): last_id}, block=READ_BLOCK_MS, count=1000)
        parts: list[bytes] = [rest]
        stopped = heard_now = False
        for _key, entries in reply or []:
            for entry_id, fields in entries:
                last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                if live.ABANDON.encode() in fields:
                    log.info("stream_abandoned", stream_id=sid)
                    return
                if b"stop" in fields:
                    stopped = True
                elif live.FLUSH.encode() in fields:  # the audio before it is fed, then made final
                    rest = _feed(r, session, sid, b"".join(parts))
                    parts = [rest]
                    heard_now = True
                    for event in session.flush():
                        live.send(r, sid, event.to_message())
                    live.send(r, sid, {"type": live.FLUSHED})
                else:
                    parts.append(fields[b"pcm"])
        if reply:
            r.xtrim(live.audio_key(sid), minid=last_id)  # what was read is the session's now
        pcm = b"".join(parts)
        if len(pcm) > 1:
            heard_now = True
        rest = _feed(r, session, sid, pcm)
        if heard_now:
            heard = time.monotonic()
        idle = not heard_now and time.monotonic() - heard > idle_s
        if idle:
            log.warning("stream_idle", stream_id=sid, idle_s=idle_s, received_s=round(session.received_s, 1))
        if stopped or idle or session.received_s >= max_s:
            for event in session.stop():
                live.send(r, sid, event.to_message())
            live.send(r, sid, {"type": live.DONE, "live": session.live_result()})
            return


def _feed(r: redis.Redis, session: Any, sid: str, pcm: bytes) -> bytes:
    """Whole samples of ``pcm`` fed to the session (its messages sent); the odd byte left over."""
    whole = len(pcm) // 2 * 2
    if whole:
        for event in session.feed(pcm_to_float(pcm[:whole])):
            live.send(r, sid, event.to_message())
    return pcm[whole:]


class StreamWorker:
    """Slots and a heartbeat, over one set of loaded models."""

    def __init__(self, settings: Settings, models: Any, worker_id: str | None = None) -> None:
        self.settings = settings
        self.models = models
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.r = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
        self.stopping = threading.Event()
        from worker.scaling import instance_protection_from_settings

        # a live stream protects its instance from scale-in as a running job does (worker/scaling.py)
        self.protection = instance_protection_from_settings(settings, role="stream")

    def run(self) -> None:
        if self.protection is not None:
            self.protection.reset()
        live.heartbeat(self.r, self.id, self.settings.stream_slots)
        threads = [threading.Thread(target=self._beat, name="heartbeat", daemon=True)]
        threads += [
            threading.Thread(target=self._slot, name=f"slot-{i}", daemon=True)
            for i in range(self.settings.stream_slots)
        ]
        for t in threads:
            t.start()
        log.info("stream_worker_ready", worker_id=self.id, slots=self.settings.stream_slots)
        try:
            self.stopping.wait()
        finally:
            live.leave(self.r, self.id)
            log.info("stream_worker_stopped", worker_id=self.id)

    def _beat(self) -> None:
        while not self.stopping.wait(live.HEARTBEAT_EVERY_S):
            try:
                live.heartbeat(self.r, self.id, self.settings.stream_slots)
            except redis.RedisError as e:  # Redis away: the next beat tries again
                log.warning("stream_heartbeat_failed", error=type(e).__name__)

    def _slot(self) -> None:
        while not self.stopping.is_set():
            try:
                item = self.r.brpop([live.start_key(self.id)], timeout=1)
            except redis.RedisError as e:
                log.warning("stream_slot_redis", error=type(e).__name__)
                self.stopping.wait(1.0)
                continue
            if item is not None:
                self._serve(live.StartRequest.from_json(item[1]))

    def _serve(self, request: live.StartRequest) -> None:
        sid = request.stream_id
        log.info("stream_started", stream_id=sid, language=request.language)
        t0 = time.monotonic()
        if self.protection is not None:
            self.protection.task_started()
        try:
            serve_stream(
                self.r, self.models, request, max_s=self.settings.stream_max_s, idle_s=self.settings.stream_idle_s
            )
        except AnalysisError as e:
            live.send(self.r, sid, {"type": "error", "code": e.code, "message": e.message})
        except Exception as e:  # noqa: BLE001 - one stream's failure is reported to its client, the slot lives on
            log.exception("stream_failed", stream_id=sid)
            live.send(self.r, sid, {"type": "error", "code": ProcessingError.code, "message": type(e).__name__})
        finally:
            live.release(self.r, self.id, sid)
            if self.protection is not None:
                self.protection.task_finished()
            log.info("stream_ended", stream_id=sid, seconds=round(time.monotonic() - t0, 1))


def main() -> None:
    from ecg_audio.logs import configure_logging
    from ops.aws import settings_with_secrets

    offline_model_env()
    settings = settings_with_secrets()
    configure_logging(settings.log_level, settings.log_json)
    worker = StreamWorker(settings, load_stream_models(settings))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stopping.set())
    worker.run()


if __name__ == "__main__":
    main()
