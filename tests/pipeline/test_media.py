"""Ingest: probing and extraction with real ffmpeg on files the tests make."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.audio import load_wav, wav_duration
from pipeline.errors import InvalidMediaError
from pipeline.media import extract_audio, probe
from tests.conftest import make_media


@pytest.mark.parametrize("ext,codec", [("mp4", ["-c:a", "aac"]), ("mkv", ["-c:a", "libopus"]),
                                       ("webm", ["-c:a", "libopus"]), ("mov", ["-c:a", "aac"])])
def test_video_containers_extract_to_16k_mono(tmp_path: Path, ffmpeg: str, sample_wav: Path, ext: str,
                                               codec: list[str]) -> None:
    src = make_media(ffmpeg, sample_wav, tmp_path / f"clip.{ext}", "-t", "3", *codec, "-shortest", video=True)
    info = probe(src)
    assert info.has_video and info.has_audio
    out = extract_audio(src, tmp_path / "out.wav")
    assert abs(out.duration - 3.0) < 0.3
    audio = load_wav(out.wav_path)
    assert audio.dtype == np.float32 and np.abs(audio).max() > 0.01


@pytest.mark.parametrize("ext", ["flac", "mp3", "m4a", "ogg", "wav"])
def test_audio_formats(tmp_path: Path, ffmpeg: str, sample_wav: Path, ext: str) -> None:
    src = make_media(ffmpeg, sample_wav, tmp_path / f"a.{ext}", "-t", "2")
    out = extract_audio(src, tmp_path / "out.wav")
    assert abs(out.duration - 2.0) < 0.2


def test_8khz_six_channel_is_downmixed(tmp_path: Path, ffmpeg: str, sample_wav: Path) -> None:
    src = make_media(ffmpeg, sample_wav, tmp_path / "six.wav", "-t", "2", "-ar", "8000", "-ac", "6")
    out = extract_audio(src, tmp_path / "out.wav")
    assert out.info.channels == 6 and out.info.sample_rate == 8000
    assert abs(wav_duration(out.wav_path) - 2.0) < 0.1


def test_empty_file_is_invalid(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(InvalidMediaError, match="empty"):
        extract_audio(empty, tmp_path / "out.wav")


def test_random_bytes_are_invalid(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(50_000))
    with pytest.raises(InvalidMediaError) as e:
        extract_audio(junk, tmp_path / "out.wav")
    assert "Traceback" not in e.value.message


def test_truncated_mp4_is_invalid(tmp_path: Path, ffmpeg: str, sample_wav: Path) -> None:
    full = make_media(ffmpeg, sample_wav, tmp_path / "full.mp4", "-t", "3", "-c:a", "aac", video=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    with pytest.raises(InvalidMediaError):
        extract_audio(cut, tmp_path / "out.wav")


def test_video_without_audio_says_so(tmp_path: Path, ffmpeg: str) -> None:
    silent = make_media(ffmpeg, None, tmp_path / "v.mp4", "-an", video=True)
    with pytest.raises(InvalidMediaError, match="no audio track"):
        extract_audio(silent, tmp_path / "out.wav")


def test_duration_limit(tmp_path: Path, ffmpeg: str, sample_wav: Path) -> None:
    src = make_media(ffmpeg, sample_wav, tmp_path / "a.wav", "-t", "5")
    with pytest.raises(InvalidMediaError, match="limit"):
        extract_audio(src, tmp_path / "out.wav", max_duration_s=2.0)


def test_ffmpeg_and_ffprobe_read_only_local_files(tmp_path: Path, ffmpeg: str, sample_wav: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ffmpeg/ffprobe run on an input carries -protocol_whitelist file,pipe, so no demuxer can
    reach the network from a downloaded file (this ffmpeg build already refuses the known nested
    opens, older ones do not; the listener test below checks the outcome here)."""
    from pipeline import media

    seen: list[list[str]] = []
    real = media._run

    def spy(cmd: list[str], timeout_s: float) -> Any:
        seen.append(cmd)
        return real(cmd, timeout_s)

    monkeypatch.setattr(media, "_run", spy)
    media.extract_audio(sample_wav, tmp_path / "a.wav")
    monkeypatch.setattr(media, "ffprobe_exe", lambda: None)  # the ffmpeg-only probe path too
    media.probe(sample_wav)
    assert len(seen) >= 3
    for cmd in seen:
        i = cmd.index("-protocol_whitelist")
        assert cmd[i + 1] == "file,pipe" and i < cmd.index("-i" if "-i" in cmd else str(sample_wav)), cmd


def test_a_playlist_naming_a_network_url_makes_no_connection(tmp_path: Path) -> None:
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    accepted = [0]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                accepted[0] += 1
                conn.close()
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()
    port = srv.getsockname()[1]
    playlist = tmp_path / "input.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:{port}/a.ts\n#EXT-X-ENDLIST\n")
    try:
        with pytest.raises(InvalidMediaError):
            extract_audio(playlist, tmp_path / "a.wav")
    finally:
        stop.set()
        srv.close()
    assert accepted[0] == 0


NOT_MEDIA = [
    ("page.mp4", b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>" + b"<p>x</p>" * 400, "html"),
    ("login.mov", b"\xef\xbb\xbf  <html lang=ko><body>\xeb\xa1\x9c\xea\xb7\xb8\xec\x9d\xb8</body></html>", "html"),
    ("error.wav", b'{"error": "AccessDenied", "message": "Request has expired"}', "json"),
    ("feed.m4a", b'<?xml version="1.0"?><Error><Code>NoSuchKey</Code></Error>', "xml"),
    ("slides.mp3", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n" + bytes(2000), "pdf"),
    ("clip.mkv", b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(2000), "zip"),
    ("photo.mp3", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(2000), "jpeg"),
    ("notes.flac", "회의록: 다음 주 월요일에 다시 만납니다.\n".encode() * 50, "text"),
    ("subs.webm", b"1\n00:00:01,000 --> 00:00:02,000\nHello\n", "text"),
]


@pytest.mark.parametrize("name,content,kind", NOT_MEDIA, ids=[n for n, _, _ in NOT_MEDIA])
def test_a_file_that_is_not_media_says_what_it_looks_like_whatever_its_name(
    tmp_path: Path, name: str, content: bytes, kind: str
) -> None:
    from ecg_audio.messages import error_message, failed
    from pipeline.media import NOT_MEDIA_KINDS

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InvalidMediaError) as e:
        extract_audio(path, tmp_path / "out.wav")
    err = e.value
    assert err.code == "INVALID_MEDIA" and err.key == "not_media" and err.values["kind"] == kind
    assert err.message.startswith("the file is not audio or video: it looks like " + NOT_MEDIA_KINDS[kind])
    assert f"though its name ends in '{path.suffix}'" in err.message and "moov" not in err.message
    # the Korean message comes from the catalog, the English detail is not left in it
    ko = error_message(err.code, err.message, "ko", key=err.key, values=err.values)
    assert ko.startswith(f"읽을 수 없는 미디어 파일입니다: 확장자({path.suffix})와 달리 ")
    assert "오디오나 비디오 파일이 아닙니다. 내용은 " in ko
    assert "looks like" not in ko
    assert failed(err.code, err.message, "ko", key=err.key, values=err.values) == f"실패: {ko}"
    assert error_message(err.code, err.message, "en", key=err.key, values=err.values) == err.message
    assert not (tmp_path / "out.wav").exists()


def test_every_kind_of_non_media_has_its_korean_name() -> None:
    from ecg_audio.messages import NOT_MEDIA_KINDS_KO
    from pipeline.media import NOT_MEDIA_KINDS

    assert set(NOT_MEDIA_KINDS) == set(NOT_MEDIA_KINDS_KO)


def test_non_media_under_a_name_that_promises_nothing_is_named_plainly(tmp_path: Path) -> None:
    from ecg_audio.messages import error_message

    path = tmp_path / "download"
    path.write_bytes(b"<html><body>502 Bad Gateway</body></html>")
    with pytest.raises(InvalidMediaError) as e:
        probe(path)
    assert e.value.message == "the file is not audio or video: it looks like an HTML web page"
    ko = error_message("INVALID_MEDIA", e.value.message, "ko", key=e.value.key, values=e.value.values)
    assert ko == "읽을 수 없는 미디어 파일입니다: 오디오나 비디오 파일이 아닙니다. 내용은 HTML 웹 페이지입니다"


@pytest.mark.parametrize("ext,args", [("wav", []), ("flac", []), ("mp3", []), ("ogg", ["-c:a", "libopus"]),
                                      ("m4a", ["-c:a", "aac"]), ("mkv", ["-c:a", "aac"])])
def test_real_media_is_never_taken_for_a_document(tmp_path: Path, ffmpeg: str, sample_wav: Path, ext: str,
                                                  args: list[str]) -> None:
    from pipeline.media import not_media_kind

    media = make_media(ffmpeg, sample_wav, tmp_path / f"a.{ext}", *args, video=ext == "mkv")
    assert not_media_kind(media) is None
    assert probe(media).has_audio
    # raw PCM of silence and of noise: binary, left to ffmpeg
    raw = tmp_path / "raw.pcm"
    raw.write_bytes(bytes(8000) + np.random.default_rng(1).bytes(8000))
    assert not_media_kind(raw) is None
