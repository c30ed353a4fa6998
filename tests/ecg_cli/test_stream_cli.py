"""``ecg-audio stream`` and ``stream-worker``: the parser, the file's audio as sent, what is printed.
(The client's stream itself runs end to end in tests/api_shim/test_stream_route.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from ecg_cli.main import build_parser
from ecg_cli.stream import file_pcm, print_message


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
