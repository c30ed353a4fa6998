"""``ecg-audio stream`` and ``stream-worker``: the parser, the file's audio as sent, what is printed;
``--mic``: the capture command per system, a virtual microphone, no microphone at all.
(The client's stream itself, from a file and from a microphone, runs end to end in
tests/api_shim/test_stream_route.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ecg_cli import mic
from ecg_cli.main import build_parser
from ecg_cli.stream import file_pcm, print_message
from pipeline.media import ffmpeg_exe
from tests.conftest import REPO


def test_the_stream_commands_parse() -> None:
    a = build_parser().parse_args(["stream", "call.wav", "--speed", "4", "--language", "en", "--num-speakers", "2"])
    assert (a.source, a.speed, a.language, a.num_speakers) == ("call.wav", 4.0, "en", 2)
    assert build_parser().parse_args(["stream-worker"]).func is not None


def test_a_file_is_sent_as_16k_mono_pcm(sample_wav: Path) -> None:
    pcm = file_pcm(sample_wav)
    assert len(pcm) % 2 == 0 and len(pcm) == pytest.approx(30.0 * 16000 * 2, rel=0.01)


def test_finals_print_with_their_speaker(capsys: pytest.CaptureFixture[str]) -> None:
    print_message({"type": "partial", "text": "hel", "start": 0.0, "end": 0.4})
    print_message({"type": "final", "id": 0, "start": 61.5, "end": 62.0, "text": "Hello?", "speaker": "SPEAKER_01"})
    print_message({"type": "speaker_update", "id": 0, "speaker": "SPEAKER_00"})
    print_message({"type": "end", "job_id": "live-1"})
    print_message({"type": "error", "code": "STREAM_WORKER_LOST", "message": "reconnect"})
    assert capsys.readouterr().out.splitlines() == [
        "[01:01.50] SPEAKER_01: Hello?",
        "  (final 0 is SPEAKER_00)",
        "job: live-1",
        "error STREAM_WORKER_LOST: reconnect",
    ]


def test_the_live_page_link_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    print_message({"type": "started", "job_id": "live-1", "view_url": "http://shim/jobs/live-1/view?token=1.x"})
    assert capsys.readouterr().out == "live page: http://shim/jobs/live-1/view?token=1.x\n"


def test_stream_takes_a_file_or_the_microphone_not_both(capsys: pytest.CaptureFixture[str]) -> None:
    a = build_parser().parse_args(["stream", "--mic", "--mic-input", "alsa:hw:1"])
    assert (a.source, a.mic, a.mic_input) == (None, True, "alsa:hw:1")
    for wrong in (["stream"], ["stream", "call.wav", "--mic"]):
        parsed = build_parser().parse_args(wrong)
        with pytest.raises(SystemExit) as exited:
            parsed.func(parsed)
        assert exited.value.code == 2 and "a media file or --mic" in capsys.readouterr().err


# `ffmpeg -devices` of a build with ALSA and PulseAudio (Debian's), and the DirectShow device list
DEVICES = """Devices:
 D. = Demuxing supported
 .E = Muxing supported
 ---
 DE alsa            ALSA audio output
  E caca            caca (color ASCII art) output device
 D  lavfi           Libavfilter virtual input device
 DE pulse           Pulse audio output
 DE video4linux2,v4l2 Video4Linux2 output device
  E xv              XV (XVideo) output device
"""
DSHOW = """[dshow @ 000001] "Integrated Webcam" (video)
[dshow @ 000001]   Alternative name "@device_pnp_\\\\?\\usb#vid"
[dshow @ 000001] "Microphone Array (Realtek(R) Audio)" (audio)
[dshow @ 000001]   Alternative name "@device_cm_{33D9A762}"
"""


def test_the_default_microphone_per_system() -> None:
    devices = mic.input_devices(DEVICES)
    assert devices == {"alsa", "lavfi", "pulse", "video4linux2", "v4l2"}
    assert mic.default_input("Linux", devices) == ("pulse", "default")
    assert mic.default_input("Linux", devices - {"pulse"}) == ("alsa", "default")
    with pytest.raises(mic.NoMicrophoneError, match="neither PulseAudio nor ALSA"):
        mic.default_input("Linux", {"lavfi"})
    assert mic.default_input("Darwin", set()) == ("avfoundation", ":0")
    names = mic.dshow_audio_devices(DSHOW)
    assert names == ["Microphone Array (Realtek(R) Audio)"]
    assert mic.default_input("Windows", set(), names) == ("dshow", "audio=Microphone Array (Realtek(R) Audio)")
    with pytest.raises(mic.NoMicrophoneError, match="DirectShow"):
        mic.default_input("Windows", set(), [])


def test_the_capture_command_gives_16k_mono_pcm_on_stdout() -> None:
    cmd = mic.capture_command("ffmpeg", *mic.parse_input("pulse:default"))
    assert cmd[cmd.index("-f") : cmd.index("-i") + 2] == ["-f", "pulse", "-i", "default"]
    assert cmd[-8:] == ["-vn", "-ac", "1", "-ar", "16000", "-f", "s16le", "-"] and "-re" not in cmd
    assert mic.parse_input("avfoundation::1") == ("avfoundation", ":1")
    assert mic.parse_input("alsa:hw:1,0") == ("alsa", "hw:1,0")
    assert "-re" in mic.capture_command("ffmpeg", "lavfi", "sine")  # a virtual input is read at real time
    with pytest.raises(ValueError, match="FORMAT:DEVICE"):
        mic.parse_input("default")


def test_a_virtual_microphone_is_captured_at_real_time() -> None:
    """ffmpeg's lavfi input as the device: 1 s of tone comes as 100 ms frames of 16 kHz pcm, over
    about a second, not at once."""
    capture = mic.Microphone(mic.capture_command(ffmpeg_exe(), "lavfi", "sine=frequency=440:duration=1.5"))
    try:
        capture.open()
        started = time.monotonic()
        frames = list(capture.chunks())
        took = time.monotonic() - started
    finally:
        capture.close()
    assert sum(map(len, frames)) == 48000 and all(len(f) == 3200 for f in frames)
    assert took > 0.4, took  # paced (ffmpeg lets the first 0.5 s out at once)


def test_no_microphone_is_a_clear_error_and_exit_code_2(tmp_path: Path) -> None:
    """For real, on a machine without one: the default input cannot be opened (here no sound server
    answers: PULSE_SERVER names none), so the command says so and exits with 2, before connecting."""
    env = os.environ | {
        "ECG_SHIM_URL": "http://127.0.0.1:9",  # never reached
        "ECG_API_KEY": "unused",
        "PULSE_SERVER": f"unix:{tmp_path / 'no-pulse-here'}",
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, "-m", "ecg_cli", "stream", "--mic"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.startswith("no microphone: ffmpeg could not capture from ")
    assert "--mic-input FORMAT:DEVICE" in done.stderr and not done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "ecg_cli", "stream", "--mic", "--mic-input", "nosuchformat:default"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "nosuchformat input 'default'" in done.stderr, done.stderr
