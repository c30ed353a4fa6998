"""``ecg-audio stream FILE``: a file sent to ``WS /v1/stream`` at real time (``--speed`` for faster),
its finals printed with their speakers as they arrive; ``--mic``: the microphone instead, until
Ctrl-C (``ecg_cli.mic``). The client half (``LiveClient``) is what
the tests and ``bench/stream.py`` drive too.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
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
        return self.stream(self._paced(pcm, speed, rate), timeout=timeout)

    def stream(self, frames: Iterable[bytes], *, timeout: float | None = 120.0) -> Iterator[dict[str, Any]]:
        """Send each of ``frames`` as it comes (a thread iterates them), then stop; yield each message
        as ``run`` does (``timeout`` None: wait for the next message however long it takes)."""
        with self.connect() as ws:
            self.started = time.monotonic()
            sender = threading.Thread(target=self._send, args=(ws, frames), daemon=True)
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

    def _paced(self, pcm: bytes, speed: float, rate: float) -> Iterator[bytes]:
        """``pcm`` in 100 ms frames, each when it is due at ``speed``; ``rate``: bytes per second of audio."""
        step = max(2, int(CHUNK_S * rate) // 2 * 2)
        for i in range(0, len(pcm), step):
            due = self.started + (i / rate) / speed
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            yield pcm[i : i + step]
            self.sent_s = (i + step) / rate

    def _send(self, ws: Any, frames: Iterable[bytes]) -> None:
        try:
            for frame in frames:
                ws.send(frame)
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
    if a.mic:
        return _stream_mic(a, LiveClient(url.replace("http", "ws", 1), api_key=key, query=query))
    if a.encoding != "pcm_s16le":
        query["encoding"] = a.encoding
    client = LiveClient(url.replace("http", "ws", 1), api_key=key, query=query)
    audio, duration = file_audio(Path(a.source), a.encoding)
    return _print_all(client.run(audio, speed=a.speed, duration_s=duration))


def _print_all(messages: Iterator[dict[str, Any]]) -> int:
    last: dict[str, Any] = {}
    for message in messages:
        print_message(message)
        last = message
    return 0 if last.get("type") == "end" else 1


def _stream_mic(a: Any, client: LiveClient) -> int:
    """The microphone until Ctrl-C (the first one stops the capture: what was heard is finished and
    becomes the job; a second one quits at once); 2 when there is no microphone."""
    import platform

    from ecg_cli import mic
    from pipeline.media import ffmpeg_exe

    try:
        if a.mic_input:
            command = mic.capture_command(ffmpeg_exe(), *mic.parse_input(a.mic_input))
        else:
            command = mic.default_command(ffmpeg_exe(), platform.system())
        capture = mic.Microphone(command)
        capture.open()
    except (mic.NoMicrophoneError, ValueError) as e:
        hint = "name an input with --mic-input FORMAT:DEVICE (e.g. pulse:default, alsa:hw:1)"
        print(f"no microphone: {e}\n{hint}", file=sys.stderr)
        return 2

    def stop(_signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C quits
        print("stopping: the last words are being finished...", file=sys.stderr, flush=True)
        capture.stop()  # the capture ends: the client sends stop after its last frame

    previous = signal.signal(signal.SIGINT, stop)
    print("listening (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        return _print_all(client.stream(capture.chunks(), timeout=None))
    finally:
        signal.signal(signal.SIGINT, previous)
        capture.close()


def _usage(parser: Any) -> int:
    parser.error("give a media file or --mic, not both")
    return 2


def cmd_stream_worker(_a: Any) -> int:
    from worker.stream import main

    main()
    return 0


def add_parsers(sub: Any, default_var: str, client_config: Any) -> None:
    """``ecg-audio stream`` and ``ecg-audio stream-worker``."""
    st = sub.add_parser("stream", help="send a file to WS /v1/stream at real time; print finals as they come")
    st.add_argument("source", nargs="?", help="a media file (or --mic)")
    st.add_argument("--mic", action="store_true", help="the default microphone (ffmpeg), until Ctrl-C")
    st.add_argument("--mic-input", metavar="FORMAT:DEVICE", help="another ffmpeg input, e.g. alsa:hw:1 (with --mic)")
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
    st.set_defaults(func=lambda a: cmd_stream(a, client_config) if (a.source is None) == a.mic else _usage(st))
    sw = sub.add_parser("stream-worker", help="serve live streams (ECG_STREAM_SLOTS at once), models preloaded")
    sw.set_defaults(func=cmd_stream_worker)
