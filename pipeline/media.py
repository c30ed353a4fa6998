"""Probe media and extract the 16 kHz mono WAV every later stage reads.

ffmpeg comes from the system when installed, else from the static binary the
``imageio-ffmpeg`` package ships. ``ffprobe`` is used when present; the static
package has none, so probing then reads what ``ffmpeg -i`` prints.
"""

from __future__ import annotations

import codecs
import functools
import json
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.audio import SAMPLE_RATE
from pipeline.errors import InvalidMediaError, ProcessingError, StageTimeoutError

VIDEO_EXTENSIONS = {".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v"}
AUDIO_EXTENSIONS = {".wav", ".flac", ".mp3", ".m4a", ".ogg", ".opus", ".aac", ".wma"}


# Inputs are files we downloaded (or were given): no demuxer may open anything but local files and
# pipes while reading them (a playlist, SDP or concat list naming http://, rtp://, tcp://: SSRF from
# inside the worker, past the URL guard). Recent ffmpeg builds restrict nested opens already; older
# ones (distribution packages, a system ffprobe) do not all do so.
LOCAL_ONLY = ("-protocol_whitelist", "file,pipe")


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError as e:  # pragma: no cover - the package is a dependency
        raise RuntimeError("ffmpeg is required: install it, or the imageio-ffmpeg package") from e
    return str(imageio_ffmpeg.get_ffmpeg_exe())


@functools.lru_cache(maxsize=1)
def ffprobe_exe() -> str | None:
    return shutil.which("ffprobe")


@dataclass(frozen=True)
class MediaInfo:
    container: str
    duration: float | None  # from the header; may be missing or wrong
    has_video: bool
    has_audio: bool
    audio_codec: str | None
    sample_rate: int | None
    channels: int | None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class ExtractedAudio:
    wav_path: Path
    duration: float  # measured on the extracted audio, not taken from the header
    info: MediaInfo


def _run(cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise StageTimeoutError(f"ffmpeg did not finish within {timeout_s:.0f} s") from e


# What a file that is not media looks like, told by its first bytes: a download link that served a
# web page (a login or error page saved as "video.mp4"), a document, an archive, a picture. ffmpeg
# would guess a demuxer from the name and report that format's error ("a truncated MP4").
NOT_MEDIA_KINDS: dict[str, str] = {
    "html": "an HTML web page",
    "xml": "an XML document",
    "json": "JSON text",
    "pdf": "a PDF document",
    "zip": "a ZIP archive (or an Office document)",
    "gzip": "a gzip archive",
    "png": "a PNG image",
    "jpeg": "a JPEG image",
    "gif": "a GIF image",
    "playlist": "a playlist (M3U), not the media it lists",
    "text": "plain text",
}
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"<!doctype html", "html"),
    (b"<html", "html"),
    (b"<head", "html"),
    (b"<body", "html"),
    (b"<?xml", "xml"),
    (b"%pdf-", "pdf"),
    (b"pk\x03\x04", "zip"),
    (b"\x1f\x8b", "gzip"),
    (b"\x89png", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"gif8", "gif"),
    (b"#extm3u", "playlist"),
)
SNIFF_BYTES = 4096


def not_media_kind(path: Path) -> str | None:
    """The key in NOT_MEDIA_KINDS of what ``path`` looks like when it is certainly not audio or
    video, else None (media, or something ffmpeg should judge). Every audio and video container
    starts with binary bytes (a NUL, or a byte that is not UTF-8, within its first kilobytes), so
    a start that is all printable text is a document, never media."""
    with open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    for signature, kind in _SIGNATURES:
        if start.startswith(signature):
            return kind
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return None
    if not text or any(not (c.isprintable() or c in "\t\r\n\f") for c in text):
        return None
    if start.startswith((b"{", b"[")):
        return "json"
    if start.startswith(b"<"):
        return "html" if b"<html" in start or b"<div" in start or b"<p>" in start else "xml"
    return "text"


def _refuse_non_media(path: Path) -> None:
    kind = not_media_kind(path)
    if kind is None:
        return
    message = f"the file is not audio or video: it looks like {NOT_MEDIA_KINDS[kind]}"
    suffix = path.suffix.lower() if path.suffix.lower() in VIDEO_EXTENSIONS | AUDIO_EXTENSIONS else ""
    if suffix:  # the name promised media
        message += f", though its name ends in '{suffix}'"
    raise InvalidMediaError(message, key="not_media", values={"kind": kind, "suffix": suffix})


def probe(path: Path, *, timeout_s: float = 60.0) -> MediaInfo:
    """Read the container's streams. Raises InvalidMediaError for files that are not media."""
    path = Path(path)
    if not path.is_file():
        raise InvalidMediaError(f"input file does not exist: {path.name}")
    if path.stat().st_size == 0:
        raise InvalidMediaError("the input file is empty (0 bytes)")
    _refuse_non_media(path)  # whatever its name says
    fp = ffprobe_exe()
    if fp:
        return _probe_ffprobe(fp, path, timeout_s)
    return _probe_ffmpeg(path, timeout_s)


def _probe_ffprobe(exe: str, path: Path, timeout_s: float) -> MediaInfo:
    cmd = [exe, "-v", "error", *LOCAL_ONLY, "-print_format", "json", "-show_format", "-show_streams", str(path)]
    res = _run(cmd, timeout_s)
    if res.returncode != 0:
        raise InvalidMediaError(_unreadable_message(res.stderr.decode(errors="replace")))
    data = json.loads(res.stdout or b"{}")
    streams = data.get("streams", [])
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    fmt = data.get("format", {})
    duration = _to_float(fmt.get("duration")) or (_to_float(audio.get("duration")) if audio else None)
    return MediaInfo(
        container=str(fmt.get("format_name", "unknown")),
        duration=duration,
        has_video=any(s.get("codec_type") == "video" and not _is_cover_art(s) for s in streams),
        has_audio=audio is not None,
        audio_codec=audio.get("codec_name") if audio else None,
        sample_rate=int(audio["sample_rate"]) if audio and audio.get("sample_rate") else None,
        channels=int(audio["channels"]) if audio and audio.get("channels") else None,
    )


def _is_cover_art(stream: dict[str, object]) -> bool:
    disp = stream.get("disposition")
    return isinstance(disp, dict) and bool(disp.get("attached_pic"))


_DURATION_RE = re.compile(r"Duration:\s*(\d+):(\d+):(\d+(?:\.\d+)?)")
_AUDIO_RE = re.compile(r"Stream #\d+:\d+.*?: Audio: (\w+)[^,\n]*(?:, (\d+) Hz)?(?:, ([\w.() ]+?))?(?:,|\n|$)")
_INPUT_RE = re.compile(r"Input #0, ([^ ]+), from")


def _probe_ffmpeg(path: Path, timeout_s: float) -> MediaInfo:
    res = _run([ffmpeg_exe(), "-hide_banner", "-nostdin", *LOCAL_ONLY, "-i", str(path)], timeout_s)
    text = res.stderr.decode(errors="replace")
    m_in = _INPUT_RE.search(text)
    if not m_in:
        raise InvalidMediaError(_unreadable_message(text))
    m_dur = _DURATION_RE.search(text)
    duration = None
    if m_dur:
        h, m, s = m_dur.groups()
        duration = int(h) * 3600 + int(m) * 60 + float(s)
    m_audio = _AUDIO_RE.search(text)
    channels = None
    if m_audio and m_audio.group(3):
        channels = _channels_from_layout(m_audio.group(3))
    video = [
        line
        for line in text.splitlines()
        if re.search(r"Stream #\d+:\d+.*: Video:", line) and "attached pic" not in line
    ]
    return MediaInfo(
        container=m_in.group(1).rstrip(","),
        duration=duration,
        has_video=bool(video),
        has_audio=m_audio is not None,
        audio_codec=m_audio.group(1) if m_audio else None,
        sample_rate=int(m_audio.group(2)) if m_audio and m_audio.group(2) else None,
        channels=channels,
    )


def _channels_from_layout(layout: str) -> int | None:
    layout = layout.strip()
    named = {"mono": 1, "stereo": 2, "2.1": 3, "quad": 4, "4.0": 4, "5.0": 5, "5.1": 6, "6.1": 7, "7.1": 8}
    for key, n in named.items():
        if layout.startswith(key):
            return n
    m = re.match(r"(\d+) channels", layout)
    return int(m.group(1)) if m else None


def _to_float(v: object) -> float | None:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if f == f and f >= 0 else None  # NaN check


def _unreadable_message(stderr: str) -> str:
    low = stderr.lower()
    if "moov atom not found" in low:
        return "the file looks like a truncated MP4 (no 'moov' index): upload the complete file"
    if "invalid data found" in low or "could not find codec parameters" in low:
        return "the file is not a media file ffmpeg can read (corrupt, truncated or not audio/video)"
    return "the file could not be read as audio or video"


def extract_audio(
    src: Path,
    dest_wav: Path,
    *,
    max_duration_s: float | None = None,
    timeout_s: float = 3600.0,
) -> ExtractedAudio:
    """Probe ``src`` and write its first audio track as 16 kHz mono 16-bit WAV to ``dest_wav``.

    Any channel count and sample rate are accepted (ffmpeg downmixes and
    resamples). Header durations are not trusted: the real duration is measured
    on the extracted audio.
    """
    info = probe(src)
    if not info.has_audio:
        what = "video" if info.has_video else "file"
        raise InvalidMediaError(f"the {what} has no audio track: there is nothing to transcribe")
    if max_duration_s is not None and info.duration is not None and info.duration > max_duration_s * 1.5:
        # a header that claims far more than the limit is refused before decoding; a header
        # that lies the other way is caught by the measured duration below
        raise InvalidMediaError(
            f"the media is {info.duration / 60:.0f} min long; the limit is {max_duration_s / 60:.0f} min"
        )
    dest_wav = Path(dest_wav)
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y", *LOCAL_ONLY, "-i", str(src)]
    cmd += ["-map", "0:a:0", "-vn"]
    if max_duration_s is not None:
        cmd += ["-t", f"{max_duration_s + 1:.3f}"]
    cmd += ["-ac", "1", "-ar", str(SAMPLE_RATE), "-c:a", "pcm_s16le", "-f", "wav", str(dest_wav)]
    res = _run(cmd, timeout_s)
    err = res.stderr.decode(errors="replace")
    if res.returncode != 0:
        dest_wav.unlink(missing_ok=True)
        low = err.lower()
        # ffmpeg 7+ says "no decoder found for: none" where older ones said "Decoder ... not found"
        no_decoder = "decoder" in low and ("not found" in low or "unknown" in low or "no decoder found" in low)
        if no_decoder or "unsupported codec" in low:
            codec = info.audio_codec if info.audio_codec not in (None, "none") else "unknown"
            raise InvalidMediaError(f"the audio codec '{codec}' is not supported: re-encode to AAC, Opus or PCM")
        raise InvalidMediaError(_unreadable_message(err))
    from pipeline.audio import wav_duration

    try:
        duration = wav_duration(dest_wav)
    except Exception as e:  # soundfile raises its own error types
        raise ProcessingError("ffmpeg produced no readable audio") from e
    if duration <= 0.0:
        dest_wav.unlink(missing_ok=True)
        raise InvalidMediaError("the audio track is empty (0 seconds of sound could be decoded)")
    if max_duration_s is not None and duration > max_duration_s:
        dest_wav.unlink(missing_ok=True)
        raise InvalidMediaError(f"the media is longer than the limit of {max_duration_s / 60:.0f} min")
    return ExtractedAudio(wav_path=dest_wav, duration=duration, info=info)
