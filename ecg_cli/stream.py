"""``ecg-audio stream FILE``: a file sent to ``WS /v1/stream`` at real time (``--speed`` for faster),
its finals printed with their speakers as they arrive. The client half (``LiveClient``) is what
the tests and ``bench/stream.py`` drive too.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

SAMPLE_RATE = 16000
CHUNK_S = 0.1  # one binary frame per 100 ms of audio, as a microphone sends it


def file_pcm(path: Path) -> bytes:
    """Any media file as 16 kHz mono pcm_s16le (ffmpeg)."""
    from pipeline.media import ffmpeg_exe

    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "1", "-ar", "16000", "-"]
    out = subprocess.run(cmd, capture_output=True, check=True, timeout=600)
    return out.stdout


def file_audio(path: Path, encoding: str = "pcm_s16le") -> tuple[bytes, float]:
    """Any media file as the bytes a client of ``encoding`` sends, and its duration in seconds:
    pcm_s16le 16 kHz mono, or WebM/Ogg Opus as a browser's MediaRecorder makes it (ffmpeg)."""
    from pipeline.media import ffmpeg_exe

    pcm = file_pcm(path)
    duration = len(pcm) / 2 / SAMPLE_RATE
    if encoding == "pcm_s16le":
        return pcm, duration
    container = {"webm_opus": "webm", "ogg_opus": "ogg"}[encoding]
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-f", "s16le", "-ar", "16000", "-ac", "1", "-i", "-"]
    cmd += ["-c:a", "libopus", "-b:a", "32k", "-f", container, "-"]
    out = subprocess.run(cmd, input=pcm, capture_output=True, check=True, timeout=600)
    return out.stdout, duration


@dataclass
class LiveClient:
    """One live stream from a client's side: audio sent paced in a thread, messages read here.

    ``received``: (seconds since the first frame was sent, message) for every message.
    """

    url: str  # ws://host:port (the shim's base URL with ws:// or wss://)
    api_key: str | None = None
    token: str | None = None
    query: dict[str, Any] = field(default_factory=dict)
    received: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    started: float = 0.0
    sent_s: float = 0.0  # seconds of audio sent so far

    def connect(self) -> Any:
        from websockets.sync.client import connect

        params = {k: v for k, v in self.query.items() if v is not None}
        if self.token:
            params["token"] = self.token
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        return connect(f"{self.url.rstrip('/')}/v1/stream?{urlencode(params)}", additional_headers=headers)

    def run(
        self, pcm: bytes, *, speed: float = 1.0, timeout: float = 120.0, duration_s: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Send ``pcm`` at ``speed`` times real time, then stop; yield each message as it comes, up to
        the last (``end`` or ``error``), or until ``timeout`` seconds pass without one. Compressed
        audio (WebM/Ogg Opus) gives its ``duration_s``: its bytes are paced evenly over it."""
        rate = len(pcm) / duration_s if duration_s else 2.0 * SAMPLE_RATE
        with self.connect() as ws:
            self.started = time.monotonic()
            sender = threading.Thread(target=self._send, args=(ws, pcm, speed, rate), daemon=True)
            sender.start()
            while True:
                try:
                    raw = ws.recv(timeout=timeout)
                except TimeoutError:
                    return
                except Exception:  # noqa: BLE001 - the server closed: the stream is over
                    return
                message = json.loads(raw)
                self.received.append((time.monotonic() - self.started, message))
                yield message
                if message["type"] in ("end", "error"):
                    return

    def _send(self, ws: Any, pcm: bytes, speed: float, rate: float) -> None:
        """``rate``: bytes per second of audio."""
        step = max(2, int(CHUNK_S * rate) // 2 * 2)
        try:
            for i in range(0, len(pcm), step):
                due = self.started + (i / rate) / speed
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                ws.send(pcm[i : i + step])
                self.sent_s = (i + step) / rate
            ws.send(json.dumps({"type": "stop"}))
        except Exception:  # noqa: BLE001 - the connection closed under us (worker lost): the reader reports it
            return


def print_message(message: dict[str, Any]) -> None:
    kind = message["type"]
    if kind == "final":
        m, s = divmod(message["start"], 60)
        print(f"[{int(m):02d}:{s:05.2f}] {message.get('speaker') or '?'}: {message['text']}", flush=True)
    elif kind == "speaker_update":
        print(f"  (final {message['id']} is {message['speaker']})", flush=True)
    elif kind == "started":
        print(f"live page: {message['view_url']}", flush=True)
    elif kind == "end":
        print(f"job: {message['job_id']}", flush=True)
    elif kind == "error":
        print(f"error {message['code']}: {message['message']}", flush=True)


def cmd_stream(a: Any, client_config: Any) -> int:
    url, key = client_config(Path(a.var_dir))
    query = {"language": a.language, "num_speakers": a.num_speakers, "max_speakers": a.max_speakers}
    if a.encoding != "pcm_s16le":
        query["encoding"] = a.encoding
    client = LiveClient(url.replace("http", "ws", 1), api_key=key, query=query)
    audio, duration = file_audio(Path(a.source), a.encoding)
    last: dict[str, Any] = {}
    for message in client.run(audio, speed=a.speed, duration_s=duration):
        print_message(message)
        last = message
    return 0 if last.get("type") == "end" else 1


def cmd_stream_worker(_a: Any) -> int:
    from worker.stream import main

    main()
    return 0


def add_parsers(sub: Any, default_var: str, client_config: Any) -> None:
    """``ecg-audio stream`` and ``ecg-audio stream-worker``."""
    st = sub.add_parser("stream", help="send a file to WS /v1/stream at real time; print finals as they come")
    st.add_argument("source", help="a media file")
    st.add_argument("--speed", type=float, default=1.0, help="times real time (default 1)")
    st.add_argument("--language", help="default: identified from the first seconds")
    st.add_argument(
        "--encoding",
        choices=["pcm_s16le", "webm_opus", "ogg_opus"],
        default="pcm_s16le",
        help="what to send: 16 kHz pcm (default), or the file as WebM/Ogg Opus, as a browser sends it",
    )
    st.add_argument("--num-speakers", type=int)
    st.add_argument("--max-speakers", type=int)
    st.add_argument("--var-dir", default=default_var)
    st.set_defaults(func=lambda a: cmd_stream(a, client_config))
    sw = sub.add_parser("stream-worker", help="serve live streams (ECG_STREAM_SLOTS at once), models preloaded")
    sw.set_defaults(func=cmd_stream_worker)
