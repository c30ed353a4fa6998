#!/usr/bin/env python3
"""Live transcription under load: N recordings streamed to ``WS /v1/stream`` at real time at once.

Starts its own Redis, ONE stream worker (``worker.stream``, ``ECG_STREAM_SLOTS`` = the largest N)
and the shim, then for each N in ``--streams`` (e.g. ``1,2,3``) opens N WebSocket clients
(``ecg_cli.stream.LiveClient``, what ``ecg-audio stream`` runs) that send the recording at
``--speed`` times real time, 100 ms a frame, all at once. Per stream:

* ``first_partial_s``: when the first ``partial`` arrived, minus when the first word was spoken (the
  reference's first turn: ``.stm``, ``.rttm`` or ``.json`` beside the recording; at speed 1, when that
  audio was sent); ``first_partial_after_its_start_s`` and ``…_after_its_end_s``: minus the start and
  the end of that partial's own words, as Whisper timed them (its word times can be off by a second);
* ``final_latency_p95_s``: per ``final``, its arrival minus the end of its last word (at speed 1);
* ``lag_max_s``: the most any message trailed the speech it carries (arrival minus its ``end``):
  a worker that keeps up stays near one decoding; one that falls behind grows without bound;
* ``decode_lag_max_s``: the most a ``partial`` trailed the speech it shows: how far the decoding
  itself runs behind the audio (a final also waits for two decodings to agree and for the pause or
  the sentence end that closes it);
* ``wer`` (``cer`` for Korean and unspaced languages): the finals' words against the reference
  (``.stm`` or a ``make_conversation.py`` ``.json`` beside the recording); ``der``: the finals as
  turns (each final one turn of its speaker, as ``result.live`` holds them) against the ``.rttm``
  beside it, no collar, overlap scored;
* the stream worker's peak RSS over the run, and per stream (RSS / N).

``batch``: the same file through the whole batch pipeline in this process (``ecg_cli.runner``,
before the stack starts), scored the same way: what the finals are compared with (``--no-batch``
skips it). ``max_n_within_2s``: the largest N at which no stream's ``lag_max_s`` exceeded 2 s.

usage: python -m bench.stream [--streams 1,2,3] [--file WAV] [--speed 1.0] [--language en]
Prints one JSON line (the machine and its load average in it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis

from bench.harness import TreeRss, emit, eprint, loadavg
from ecg_audio import live
from ecg_cli.stream import LiveClient, file_pcm
from ops.stack import free_port, start_redis, stream_worker_command

REPO = Path(__file__).resolve().parents[1]
API_KEY = "stream-bench-key-0123456789"
LAG_LIMIT_S = 2.0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))], 3)


def reference_of(wav: Path) -> Path | None:
    """The words' reference beside ``wav``: a ``.stm`` (pyannote's sample) or a ``.json``."""
    return next((p for p in (wav.with_suffix(".stm"), wav.with_suffix(".json")) if p.is_file()), None)


def scores(segments: list[dict[str, Any]], wav: Path, language: str | None, duration: float) -> dict[str, Any]:
    """WER (CER for the languages scored by characters) and DER of ``segments`` (``start``, ``end``,
    ``text``, ``speaker``; each one turn of its speaker), with the scorers of the tests and of
    ``bench.quality``: one definition of each."""
    from bench.quality import character_error_rate, reference_text
    from pipeline.language_rules import CER_LANGUAGES
    from tests.scoring import edits, load_reference, load_rttm, words

    ref, rttm = reference_of(wav), wav.with_suffix(".rttm")
    ordered = sorted(segments, key=lambda x: x["start"])
    out: dict[str, Any] = {"wer": None, "cer": None, "der": None}
    if ref is not None and language in CER_LANGUAGES:
        out["cer"] = character_error_rate(reference_text(ref), " ".join(x["text"] for x in ordered))
    elif ref is not None:
        turns = load_reference(ref) if ref.suffix == ".stm" else []
        ref_words = [w for t in sorted(turns, key=lambda t: t[1]) for w in words(t[3])] or words(reference_text(ref))
        hyp = [w for x in ordered for w in words(x["text"])]
        out["wer"] = round(edits(ref_words, hyp) / max(1, len(ref_words)), 4)
    if rttm.is_file():
        from pyannote.core import Annotation, Segment
        from pyannote.metrics.diarization import DiarizationErrorRate

        reference, hypothesis = Annotation(), Annotation()
        for speaker, start, end in load_rttm(rttm):
            reference[Segment(start, end)] = speaker
        for x in ordered:
            if x["end"] > x["start"]:
                hypothesis[Segment(x["start"], x["end"])] = x["speaker"] or "?"
        metric = DiarizationErrorRate(collar=0.0, skip_overlap=False)
        out["der"] = round(float(metric(reference, hypothesis, uem=Segment(0, duration))), 4)
    return out


def batch_figures(wav: Path, language: str | None) -> dict[str, Any]:
    """The batch pipeline on the same file, in this process, scored as the finals are."""
    from ecg_audio.logs import configure_logging
    from ecg_cli.runner import analyze

    configure_logging("WARNING", json_output=False)  # to stderr: stdout carries only the JSON line
    t0 = time.perf_counter()
    result = analyze(str(wav), language=language)["result"]
    md = result["metadata"]
    turns = [{**t, "text": ""} for t in result["diarization"]]
    der = scores(turns, wav, md.get("language"), md["duration"])["der"]
    words = scores(result["segments"], wav, md.get("language"), md["duration"])
    return {
        "language": md.get("language"),
        "speakers": md["speakers_detected"],
        "wer": words["wer"],
        "cer": words["cer"],
        "der": der,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def first_speech(wav: Path) -> float | None:
    """When the recording's first word is spoken, from the reference beside it (None without one)."""
    from tests.scoring import load_reference, load_rttm

    ref, rttm = reference_of(wav), wav.with_suffix(".rttm")
    if ref is not None:
        return min((t[1] for t in load_reference(ref)), default=None)
    if rttm.is_file():
        return min((start for _, start, _ in load_rttm(rttm)), default=None)
    return None


def stream_figures(client: LiveClient, speed: float, wav: Path, duration: float) -> dict[str, Any]:
    spoken = first_speech(wav)
    timed = [(t * speed, m) for t, m in client.received]  # arrival in audio seconds at speed 1
    partials = [(t, m) for t, m in timed if m["type"] == "partial"]
    finals = [(t, m) for t, m in timed if m["type"] == "final"]
    last = client.received[-1][1] if client.received else {}
    return {
        "ended": last.get("type") == "end",
        "error": last.get("code") if last.get("type") == "error" else None,
        "first_partial_s": round(partials[0][0] - spoken, 3) if partials and spoken is not None else None,
        "first_partial_after_its_start_s": round(partials[0][0] - partials[0][1]["start"], 3) if partials else None,
        "first_partial_after_its_end_s": round(partials[0][0] - partials[0][1]["end"], 3) if partials else None,
        "final_latency_p50_s": percentile([t - m["end"] for t, m in finals], 50),
        "final_latency_p95_s": percentile([t - m["end"] for t, m in finals], 95),
        "lag_max_s": round(max((t - m["end"] for t, m in partials + finals), default=0.0), 3),
        "decode_lag_max_s": round(max((t - m["end"] for t, m in partials), default=0.0), 3),
        "finals": len(finals),
        "language": finals[0][1].get("language") if finals else None,
        "speakers": len({m["speaker"] for _, m in finals}),
        **scores([m for _, m in finals], wav, finals[0][1].get("language") if finals else None, duration),
    }


def run_round(url: str, pcm: bytes, n: int, speed: float, language: str | None, wav: Path) -> list[dict[str, Any]]:
    clients = [LiveClient(url, api_key=API_KEY, query={"language": language}) for _ in range(n)]
    threads = [
        threading.Thread(target=lambda c=c: list(c.run(pcm, speed=speed, timeout=120)), daemon=True) for c in clients
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    duration = len(pcm) / 2 / 16000
    return [stream_figures(c, speed, wav, duration) for c in clients]


def start_stack(var: Path, slots: int) -> tuple[list[subprocess.Popen[bytes]], str, str]:
    port = free_port()
    redis_proc = start_redis(var / "redis", port, appendonly=False)
    redis_url = f"redis://127.0.0.1:{port}/0"
    env = dict(os.environ) | {
        "ECG_REDIS_URL": redis_url,
        "ECG_API_KEYS": f'["{API_KEY}"]',
        "ECG_VAR_DIR": os.environ.get("ECG_VAR_DIR", str(REPO / "var")),
        "ECG_STREAM_SLOTS": str(slots),
        "ECG_LOG_JSON": "true",
        "HF_HUB_OFFLINE": "1",
        "PYANNOTE_METRICS_ENABLED": "false",
    }
    logs = var / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    worker = subprocess.Popen(  # noqa: S603
        stream_worker_command(),
        env=env,
        cwd=REPO,
        stdout=open(logs / "worker.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    shim_port = free_port()
    shim = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "uvicorn", "api_shim.app:app", "--host", "127.0.0.1", "--port", str(shim_port)],
        env=env,
        cwd=REPO,
        stdout=open(logs / "shim.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    r = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 600
    while live.slot_counts(r) != (0, slots):
        if worker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"stream worker did not start: see {logs / 'worker.log'}")
        time.sleep(0.5)
    return [worker, shim, redis_proc], f"ws://127.0.0.1:{shim_port}", redis_url


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", default="1,2,3", help="numbers of concurrent streams, one round each")
    p.add_argument("--file", type=Path, help="a recording (default: pyannote's sample, scored with its .stm)")
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--language", default="en", help="'' to have it identified")
    p.add_argument("--no-batch", action="store_true", help="skip the batch pipeline's figures on the same file")
    a = p.parse_args()
    from pipeline.diarize import bundled_sample

    wav = a.file or bundled_sample()
    counts = [int(x) for x in a.streams.split(",")]
    pcm = file_pcm(wav)
    batch = None if a.no_batch else batch_figures(wav, a.language or None)
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        procs, url, _ = start_stack(Path(tmp), max(counts))
        rss = TreeRss(procs[0].pid).start()
        rounds: list[dict[str, Any]] = []
        try:
            time.sleep(3)  # the shim answers by now (its start is far shorter than the worker's)
            for n in counts:
                eprint(f"stream bench: {n} stream(s) at {a.speed}x")
                rss.reset_window()
                streams = run_round(url, pcm, n, a.speed, a.language or None, wav)
                peak = rss.window_peak()
                rounds.append(
                    {
                        "n": n,
                        "worker_rss_mb": round(peak / 2**20),
                        "rss_per_stream_mb": round(peak / 2**20 / n),
                        "streams": streams,
                    }
                )
        finally:
            rss.stop()
            for proc in procs:
                proc.terminate()
                proc.wait(20)
    within = [r["n"] for r in rounds if all(s["ended"] and s["lag_max_s"] <= LAG_LIMIT_S for s in r["streams"])]
    from worker.cpu import cpu_model_name

    emit(
        {
            "bench": "stream",
            "file": wav.name,
            "speed": a.speed,
            "cpu": cpu_model_name(),
            "cores": len(os.sched_getaffinity(0)),
            "max_n_within_2s": max(within, default=0),
            "batch": batch,
            "rounds": rounds,
        },
        load_before,
        loadavg(),
    )


if __name__ == "__main__":
    main()
