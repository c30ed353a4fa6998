"""``ecg-audio stream --mic``: the default microphone as 16 kHz mono pcm_s16le, captured by ffmpeg.

The input is an ffmpeg input device, ``FORMAT:DEVICE``: by default PulseAudio's (else ALSA's)
``default`` source on Linux, AVFoundation's first audio device (``:0``) on macOS, DirectShow's first
audio device on Windows. ``--mic-input`` names another, e.g. ``alsa:hw:1`` or, for a test without a
microphone, ffmpeg's virtual ``lavfi`` input (``lavfi:sine=frequency=440``, or a file played as if
spoken: ``lavfi:amovie=call.wav``), which is read at real time as a device is.

No device to capture from (no sound server, no card, an ffmpeg built without the input) is a
``NoMicrophoneError``: ``ecg-audio stream`` says why and exits with 2.
"""

from __future__ import annotations

import queue
import re
import subprocess
import tempfile
import threading
from collections.abc import Iterator

SAMPLE_RATE = 16000
CHUNK_BYTES = 2 * SAMPLE_RATE // 10  # 100 ms of pcm_s16le mono, the frame ecg-audio stream sends
FIRST_AUDIO_S = 10.0  # a device that gives no audio this long after it was opened is not capturing
# what ffmpeg writes to stdout: what WS /v1/stream takes by default
PCM_OUT = ("-vn", "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "s16le", "-")


class NoMicrophoneError(RuntimeError):
    """No input device could be captured from; the message says which and why."""


def input_devices(devices_listing: str) -> set[str]:
    """The input devices (demuxers) in the output of ``ffmpeg -devices``."""
    found: set[str] = set()
    for line in devices_listing.splitlines():
        m = re.match(r"\s*D[E ]?\s+(\S+)", line)
        if m:
            found.update(m.group(1).split(","))
    return found


def dshow_audio_devices(listing: str) -> list[str]:
    """The audio devices' names in the output of ``ffmpeg -list_devices true -f dshow -i dummy``."""
    return re.findall(r'"([^"]+)"\s*\(audio\)', listing)


def default_input(system: str, devices: set[str], dshow_audio: list[str] | None = None) -> tuple[str, str]:
    """The default microphone as (ffmpeg input format, device) on ``system`` (``platform.system()``),
    given the input devices this ffmpeg has (``input_devices``)."""
    if system == "Linux":
        for fmt in ("pulse", "alsa"):  # PulseAudio (and PipeWire's pulse server) first, else the card
            if fmt in devices:
                return fmt, "default"
        raise NoMicrophoneError("this ffmpeg can capture from neither PulseAudio nor ALSA (no 'pulse'/'alsa' input)")
    if system == "Darwin":
        return "avfoundation", ":0"
    if system == "Windows":
        if not dshow_audio:
            raise NoMicrophoneError("DirectShow lists no audio input device")
        return "dshow", f"audio={dshow_audio[0]}"
    raise NoMicrophoneError(f"no default microphone known on {system}: name one with --mic-input FORMAT:DEVICE")


def parse_input(spec: str) -> tuple[str, str]:
    """``FORMAT:DEVICE`` (``pulse:default``, ``alsa:hw:1``, ``avfoundation::1``, ``lavfi:sine``)."""
    fmt, sep, device = spec.partition(":")
    if not sep or not fmt or not device:
        raise ValueError(f"--mic-input {spec!r}: FORMAT:DEVICE, e.g. pulse:default or alsa:hw:1")
    return fmt, device


def capture_command(ffmpeg: str, fmt: str, device: str) -> list[str]:
    """ffmpeg capturing ``device`` as 16 kHz mono pcm_s16le on stdout until it is stopped. A virtual
    input (lavfi) is read at real time (``-re``), as a device gives its audio."""
    realtime = ["-re"] if fmt == "lavfi" else []
    return [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", *realtime, "-f", fmt, "-i", device, *PCM_OUT]


def default_command(ffmpeg: str, system: str) -> list[str]:
    """The capture command for the default microphone of this machine."""
    listing = subprocess.run([ffmpeg, "-hide_banner", "-devices"], capture_output=True, text=True, timeout=30)
    dshow = None
    if system == "Windows":
        probe = [ffmpeg, "-hide_banner", "-list_devices", "true", "-f", "dshow", "-i", "dummy"]
        dshow = dshow_audio_devices(subprocess.run(probe, capture_output=True, text=True, timeout=30).stderr)
    fmt, device = default_input(system, input_devices(listing.stdout), dshow)
    return capture_command(ffmpeg, fmt, device)


class Microphone:
    """ffmpeg capturing one input: ``open()`` waits for its first audio (or raises
    ``NoMicrophoneError``), ``chunks()`` yields 100 ms frames as they come until ``stop()`` (safe from
    a signal handler) or the end of the input."""

    def __init__(self, command: list[str]) -> None:
        self.command = command
        self._frames: queue.Queue[bytes | None] = queue.Queue()
        self._proc: subprocess.Popen[bytes] | None = None
        self._errors = tempfile.TemporaryFile()
        self._first: bytes | None = None

    def open(self, first_within_s: float = FIRST_AUDIO_S) -> None:
        try:
            self._proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._errors
            )
        except OSError as e:
            raise NoMicrophoneError(f"ffmpeg did not start: {e}") from e
        threading.Thread(target=self._read, daemon=True).start()
        try:
            first = self._frames.get(timeout=first_within_s)
        except queue.Empty:
            self.stop()
            raise NoMicrophoneError(f"{self._input()} gave no audio within {first_within_s:.0f} s") from None
        if first is None:
            self._proc.wait(10)
            raise NoMicrophoneError(f"ffmpeg could not capture from {self._input()}: {self._why()}")
        self._first = first

    def chunks(self) -> Iterator[bytes]:
        if self._first is not None:
            yield self._first
            self._first = None
        while (frame := self._frames.get()) is not None:
            yield frame

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()  # ffmpeg ends its output; the reader sees the end

    def close(self) -> None:
        self.stop()
        if self._proc is not None:
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._errors.close()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while frame := self._proc.stdout.read(CHUNK_BYTES):
            self._frames.put(frame)
        self._frames.put(None)

    def _input(self) -> str:
        i = self.command.index("-i")
        return f"{self.command[i - 1]} input {self.command[i + 1]!r}"

    def _why(self) -> str:
        self._errors.seek(0)
        text = self._errors.read().decode(errors="replace")
        lines = [re.sub(r"^\[[^]]*\]\s*", "", x).strip() for x in text.splitlines() if x.strip()]  # "[in#0 @ 0x..] "
        return "; ".join(lines)[:400] or f"ffmpeg exited with {self._proc.returncode if self._proc else '?'}"
