"""The shim under attack and under bad input: a table of hostile inputs, each with its outcome.

Request rows go to the real shim and must be refused with the listed status and a
message a person can act on. Media rows are uploaded through ``/api/uploads``, run
on the real worker via ``process-video``, and must end as the listed job state and
error code, with a message that is no stack trace. After the whole table the same
worker serves a good job, and neither the worker's nor the shim's log holds a
secret (API key, callback signing key, tokens inside URLs).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEY, Proc, Receiver, make_media, wait_for_worker, wait_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROCESS = "/api/upload-video/process-video"
NO_JOB = "/jobs/hostile-no-such-job"
GOOD_BODY = {"job_id": "hostile-never-accepted", "video_url": "upload://" + "0" * 32}

# Secrets the table plants in URLs; none may reach a log or an error message.
URL_TOKEN = "tok-" + uuid.uuid4().hex
URL_PASSWORD = "pw-" + uuid.uuid4().hex
CALLBACK_TOKEN = "cb-" + uuid.uuid4().hex


# --- request rows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestRow:
    """One hostile request and what the shim must answer."""

    name: str
    expect: int
    detail: str  # a phrase the answer must hold: the message a person reads
    method: str = "POST"
    path: str = PROCESS
    json_body: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    key: str | None = API_KEY  # None: no Authorization header at all
    chunked: bool = False  # send a 100 KiB JSON body with no Content-Length


def _body(**fields: Any) -> dict[str, Any]:
    return {**GOOD_BODY, **fields}


REQUEST_ROWS = [
    # --- authentication: closed by default
    RequestRow("no key", 401, "missing API key", method="GET", path=NO_JOB, key=None),
    RequestRow("wrong key", 403, "not accepted", method="GET", path=NO_JOB, key="not-the-key"),
    RequestRow("key prefix", 403, "not accepted", method="GET", path=NO_JOB, key=API_KEY[:-1]),
    RequestRow("key plus a byte", 403, "not accepted", method="GET", path=NO_JOB, key=API_KEY + "x"),
    RequestRow(
        "basic auth scheme",
        401,
        "missing API key",
        method="GET",
        path=NO_JOB,
        key=None,
        headers={"Authorization": "Basic dGVzdDp0ZXN0"},
    ),
    RequestRow("no key on upload", 401, "missing API key", path="/api/uploads", content=b"\x00" * 64, key=None),
    RequestRow("no key on cancel", 401, "missing API key", method="DELETE", path=NO_JOB, key=None),
    # --- malformed and mistyped bodies
    RequestRow(
        "malformed JSON",
        422,
        "JSON decode error",
        content=b'{"job_id": "x", ',
        headers={"Content-Type": "application/json"},
    ),
    RequestRow("JSON array, not object", 422, "valid dictionary", json_body=[GOOD_BODY]),
    RequestRow(
        "not JSON at all",
        422,
        "valid dictionary",
        content=b"job_id=x&video_url=y",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ),
    RequestRow("missing job_id", 422, "Field required", json_body={"video_url": GOOD_BODY["video_url"]}),
    RequestRow("missing video_url", 422, "Field required", json_body={"job_id": "x"}),
    RequestRow("job_id is a number", 422, "valid string", json_body=_body(job_id=12345)),
    RequestRow("unknown field", 422, "Extra inputs are not permitted", json_body=_body(admin=True)),
    RequestRow("num_speakers mistyped", 422, "valid integer", json_body=_body(options={"num_speakers": "three"})),
    RequestRow("num_speakers zero", 422, "greater than or equal to 1", json_body=_body(options={"num_speakers": 0})),
    RequestRow(
        "num_speakers with min", 422, "not both", json_body=_body(options={"num_speakers": 2, "min_speakers": 1})
    ),
    RequestRow(
        "5000-digit number",
        400,
        "error parsing the body",
        content=b'{"job_id":"x","video_url":"y","options":{"num_speakers":' + b"9" * 5000 + b"}}",
        headers={"Content-Type": "application/json"},
    ),
    RequestRow(
        "JSON nested 20000 deep",
        400,
        "error parsing the body",
        content=b"[" * 20000 + b"]" * 20000,
        headers={"Content-Type": "application/json"},
    ),
    # --- job_id: no traversal, no control characters, bounded
    RequestRow("job_id traversal", 422, "String should match pattern", json_body=_body(job_id="../../etc/passwd")),
    RequestRow("job_id dot-dot inside", 422, "must not contain '..'", json_body=_body(job_id="a..b")),
    RequestRow("job_id slash", 422, "String should match pattern", json_body=_body(job_id="a/b")),
    RequestRow("job_id newline", 422, "String should match pattern", json_body=_body(job_id="job\n")),
    RequestRow("job_id NUL", 422, "String should match pattern", json_body=_body(job_id="job\x00x")),
    RequestRow("job_id 129 chars", 422, "at most 128 characters", json_body=_body(job_id="a" * 129)),
    RequestRow("job_id Cyrillic homoglyph", 422, "String should match pattern", json_body=_body(job_id="j\u043eb")),
    RequestRow("GET job traversal", 404, "Not Found", method="GET", path="/jobs/..%2F..%2Fetc%2Fpasswd"),
    RequestRow("GET job NUL", 404, "no such job", method="GET", path="/jobs/a%00b"),
    RequestRow("GET job 300 chars", 404, "no such job", method="GET", path="/jobs/" + "a" * 300),
    RequestRow("DELETE unknown job", 404, "no such job", method="DELETE", path=NO_JOB),
    # --- sizes and odd unicode
    RequestRow(
        "1 MiB video_url", 413, "larger than 65536 bytes", json_body=_body(video_url="https://a.b/" + "x" * 2**20)
    ),
    RequestRow("100 KiB chunked body", 413, "larger than 65536 bytes", chunked=True),
    RequestRow(
        "3000-char video_url", 422, "at most 2048 characters", json_body=_body(video_url="https://a.b/" + "x" * 3000)
    ),
    RequestRow(
        "zero-width space in URL host",
        422,
        "whitespace or control characters",
        json_body=_body(video_url="https://exa\u200bmple.com/a.mp4"),
    ),
    RequestRow(
        "right-to-left override in URL",
        422,
        "whitespace or control characters",
        json_body=_body(video_url="https://example.com/\u202egnp.mp4"),
    ),
    RequestRow(
        "lone surrogate in video_url",
        422,
        "unicode",
        content=b'{"job_id":"x","video_url":"https://a.b/\\ud800"}',
        headers={"Content-Type": "application/json"},
    ),
    RequestRow(
        "lone surrogate as JSON key",
        422,
        "unicode",
        content=b'{"job_id":"x","video_url":"y","\\udfff":1}',
        headers={"Content-Type": "application/json"},
    ),
    RequestRow("emoji job_id", 422, "String should match pattern", json_body=_body(job_id="\U0001f4a5")),
    RequestRow("language injection", 422, "String should match pattern", json_body=_body(language="en; rm -rf /")),
    RequestRow("language not available", 422, "ECG_ASR_MULTILINGUAL_MODEL", json_body=_body(language="xx")),
    RequestRow("unknown ASR model", 422, "options.model", json_body=_body(options={"model": "../../models/evil"})),
    # --- sources the shim must not accept
    RequestRow("file:// URL", 422, "file:// URLs are not accepted", json_body=_body(video_url="file:///etc/passwd")),
    RequestRow("local path", 422, "local files are not accepted", json_body=_body(video_url="/etc/passwd")),
    RequestRow("gopher URL", 422, "scheme 'gopher' is not accepted", json_body=_body(video_url="gopher://a.b/x")),
    RequestRow(
        "upload id traversal", 422, "malformed upload id", json_body=_body(video_url="upload://../../etc/passwd")
    ),
    RequestRow("metadata service", 422, "link-local", json_body=_body(video_url="http://169.254.169.254/latest/")),
    RequestRow("callback to private net", 422, "callback_url", json_body=_body(callback_url="http://10.0.0.1/cb")),
    RequestRow("callback ftp", 422, "callback_url", json_body=_body(callback_url="ftp://a.b/cb")),
    # --- uploads
    RequestRow("empty upload", 422, "the upload is empty", path="/api/uploads", content=b""),
]


def _chunks() -> Iterator[bytes]:
    yield b'{"job_id": "x", "video_url": "'
    for _ in range(100):
        yield b"x" * 1024
    yield b'"}'


@pytest.mark.parametrize("row", REQUEST_ROWS, ids=[r.name for r in REQUEST_ROWS])
def test_request_row(shim: str, submitted: Submitted, row: RequestRow) -> None:
    # ``submitted`` only so the worker runs the media rows while these rows are sent
    headers = dict(row.headers)
    if row.key is not None:
        headers["Authorization"] = f"Bearer {row.key}"
    kwargs: dict[str, Any] = {"headers": headers}
    if row.chunked:
        kwargs["content"] = _chunks()  # no Content-Length: the cap must hold on the stream itself
        headers["Content-Type"] = "application/json"
    elif row.json_body is not None:
        kwargs["json"] = row.json_body
    elif row.content is not None:
        kwargs["content"] = row.content
    r = httpx.request(row.method, shim + row.path, timeout=30, **kwargs)
    assert r.status_code == row.expect, (row.name, r.status_code, r.text[:500])
    # RFC 9457 problem details, keeping `detail` (what the backend reads)
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    problem = r.json()
    assert problem["status"] == row.expect and problem["code"] and problem["title"] and "detail" in problem, problem
    assert row.detail in r.text, (row.name, r.text[:500])
    assert "Traceback" not in r.text and 'File "' not in r.text
    assert len(r.content) < 16 * 1024, "an error answer echoes the input"


def test_declared_oversize_upload_is_refused_before_the_body(shim: str) -> None:
    """A Content-Length over max_download_bytes is refused (413) without sending a byte of body."""
    host, port = shim.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /api/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode() + b"\r\n"
            b"Content-Length: 99999999999999\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        raw = b""
        while b"upload larger than" not in raw:  # headers and body may arrive in separate reads
            chunk = s.recv(65536)
            if not chunk:
                break
            raw += chunk
        answer = raw.decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer[:300]
    assert "upload larger than" in answer


def test_declared_oversize_json_is_refused_before_the_body(shim: str) -> None:
    host, port = shim.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST " + PROCESS.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode() + b"\r\n"
            b"Content-Length: 1000000\r\nContent-Type: application/json\r\n\r\n"
        )
        raw = b""
        while b"upload larger than" not in raw:  # headers and body may arrive in separate reads
            chunk = s.recv(65536)
            if not chunk:
                break
            raw += chunk
        answer = raw.decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer[:300]


def test_no_keys_configured_refuses_every_protected_route(redis_url: str, tmp_path: Path) -> None:
    """With ECG_API_KEYS empty (or only empty strings) nothing but /health and the docs answers."""
    from fastapi.testclient import TestClient

    from api_shim.app import create_app
    from ecg_audio.settings import Settings

    open_paths = {
        "/health", "/health/live", "/health/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"
    }
    for keys in ([], [""]):
        settings = Settings(api_keys=keys, redis_url=redis_url, workspace_root=tmp_path / "ws", log_json=True)
        app = create_app(settings)
        client = TestClient(app)  # no lifespan: no dispatcher needed to answer 401/403
        # the documented operations: routes live in included routers, which app.routes does not flatten
        operations = [
            (method.upper(), path)
            for path, item in app.openapi()["paths"].items()
            if path not in open_paths
            for method in item
        ]
        assert len(operations) >= 5
        for method, template in operations:
            path = template.replace("{job_id}", "some-job")
            for auth, expect in ((None, 401), ("Bearer ", 401), ("Bearer anything", 403), ("Bearer  ", 401)):
                headers = {"Authorization": auth} if auth else {}
                r = client.request(method, path, headers=headers, json=GOOD_BODY)
                assert r.status_code == expect, (keys, method, path, auth, r.status_code, r.text)
        assert client.get("/health").status_code == 200
        assert not (tmp_path / "uploads").exists() or not any((tmp_path / "uploads").iterdir())


def test_a_silent_name_server_costs_a_submission_a_deadline_not_a_thread(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Submission resolves the media host; a resolver that never answers is cut off at the deadline.

    More submissions than the DNS pool has threads still each get their answer (503, retry) on time.
    """
    from fastapi.testclient import TestClient

    import api_shim.app as shim_app
    from api_shim import dns
    from ecg_audio.settings import Settings

    release = threading.Event()
    answered: list[str] = []  # lookups that returned: none until the test releases them

    def never_answers(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        release.wait(600)
        answered.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "too late")

    monkeypatch.setattr(dns, "DNS_DEADLINE_S", 0.5)
    monkeypatch.setattr(dns.socket, "getaddrinfo", never_answers)
    settings = Settings(api_keys=[API_KEY], redis_url=redis_url, workspace_root=tmp_path / "ws")
    client = TestClient(shim_app.create_app(settings), headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        for n in range(10):  # the pool has 8 threads: the last two wait for none of them
            r = client.post(PROCESS, json=_body(job_id=f"dns-{n}", video_url=f"https://slow-{n}.example/a.mp4"))
            assert answered == [], "the submission waited for a lookup (or a pool thread), not its deadline"
            # a name server that does not answer may answer later: 503 and when to retry, not a final 4xx
            assert r.status_code == 503 and "no DNS answer within 0.5 s" in r.json()["detail"], r.text
            assert int(r.headers["retry-after"]) > 0, r.headers
    finally:
        release.set()


# --- media rows -----------------------------------------------------------------------------------


def _wav_header(fmt_tag: int, channels: int, rate: int, bits: int, data_len: int) -> bytes:
    block = channels * bits // 8
    fmt = struct.pack("<IHHIIHH", 16, fmt_tag, channels, rate, rate * block, block, bits)
    return b"RIFF" + struct.pack("<I", 36 + data_len) + b"WAVEfmt " + fmt + b"data" + struct.pack("<I", data_len)


@dataclass(frozen=True)
class MediaRow:
    """One medium, uploaded and run as a job, and how the job must end."""

    name: str
    make: Callable[[Path, str, Path], bytes] | None  # (tmp dir, ffmpeg, speech) -> file; None: no upload
    status: str  # "failed" or "completed"
    error_code: str | None = None
    message: str | None = None  # a phrase of the message a person reads
    check: Callable[[dict[str, Any]], None] | None = None


# pyannote's sample.wav is silent for its first 6.7 s: take 8 s of conversation after that
SPEECH = ("-ss", "6.5", "-t", "8")


def _ff(tmp: Path, ff: str, src: Path | None, name: str, *args: str, video: bool = False) -> bytes:
    return make_media(ff, src, tmp / name, *args, video=video, seconds=3).read_bytes()


def _truncated_mp4(tmp: Path, ff: str, speech: Path) -> bytes:
    whole = _ff(tmp, ff, speech, "whole.mp4", "-t", "3", "-c:a", "aac", "-shortest", video=True)
    return whole[: len(whole) // 2]


def _no_segments(result: dict[str, Any]) -> None:
    md = result["metadata"]
    assert result["segments"] == [] and md["words"] == 0 and md["segments_created"] == 0, md
    assert result["diarization"] == [] and result["speakers"] == {} and md["speakers_detected"] == 0, result


def _too_short_for_a_speaker(result: dict[str, Any]) -> None:
    # no speaker turn fits in 0.1 s; Whisper may still hear a stray word in a tone, left unattributed
    assert result["metadata"]["duration"] == 0.1 and result["diarization"] == [], result
    assert all(seg["speaker"] is None for seg in result["segments"]), result["segments"]


def _speech_found(result: dict[str, Any]) -> None:
    assert result["metadata"]["words"] > 0 and result["segments"], result["metadata"]


MEDIA_ROWS = [
    MediaRow(
        "random bytes named .mp4", lambda t, f, s: os.urandom(64 * 1024), "failed", "INVALID_MEDIA", "not a media file"
    ),
    MediaRow("truncated mp4", _truncated_mp4, "failed", "INVALID_MEDIA", "truncated MP4"),
    MediaRow(
        "video without audio",
        lambda t, f, s: _ff(t, f, None, "mute.mp4", "-an", video=True),
        "failed",
        "INVALID_MEDIA",
        "no audio track",
    ),
    MediaRow(
        "unknown audio codec",
        lambda t, f, s: _wav_header(0x1234, 1, 16000, 16, 32000) + os.urandom(32000),
        "failed",
        "INVALID_MEDIA",
        "is not supported: re-encode",
    ),
    MediaRow(
        "zero-length audio",
        lambda t, f, s: _wav_header(1, 1, 16000, 16, 0),
        "failed",
        "INVALID_MEDIA",
        "audio track is empty",
    ),
    MediaRow(
        "absurd duration header",
        lambda t, f, s: _wav_header(1, 1, 1, 16, 400_000) + bytes(400_000),
        "failed",
        "INVALID_MEDIA",
        "the limit is 240 min",
    ),
    MediaRow(
        "HTML page",
        lambda t, f, s: b"<!doctype html><html><body>" + b"<p>hi</p>" * 500 + b"</body></html>",
        "failed",
        "INVALID_MEDIA",
        "not audio or video: it looks like an HTML web page",
    ),
    MediaRow("upload id that names nothing", None, "failed", "INVALID_MEDIA", "uploaded file is gone"),
    MediaRow(
        "8 kHz speech",
        lambda t, f, s: _ff(t, f, s, "8k.wav", *SPEECH, "-ar", "8000", "-ac", "1"),
        "completed",
        check=_speech_found,
    ),
    MediaRow(
        "6-channel speech",
        lambda t, f, s: _ff(t, f, s, "51.m4a", *SPEECH, "-ac", "6", "-ar", "48000", "-c:a", "aac"),
        "completed",
        check=_speech_found,
    ),
    MediaRow(
        "a tenth of a second of tone",
        lambda t, f, s: _ff(t, f, None, "blip.wav", "-f", "lavfi", "-i", "sine=f=440:r=16000", "-t", "0.1"),
        "completed",
        check=_too_short_for_a_speaker,
    ),
    MediaRow(
        "pure silence",
        lambda t, f, s: _ff(t, f, None, "quiet.wav", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "5"),
        "completed",
        check=_no_segments,
    ),
]


class MediaServer:
    """A plain HTTP server on 127.0.0.1 (allow-listed in the test stack): path -> (status, headers, body)."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[int, dict[str, str], bytes]] = {}
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                status, headers, body = files.get(self.path.split("?", 1)[0], (404, {}, b"not here"))
                self.send_response(status)
                for k, v in {"Content-Type": "text/plain", "Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def media_server() -> Iterator[MediaServer]:
    server = MediaServer()
    # a Content-Length over ECG_MAX_DOWNLOAD_BYTES (4 GiB), and no body: refused on the header alone
    server.files["/huge.mp4"] = (200, {"Content-Type": "video/mp4", "Content-Length": str(5 * 1024**3)}, b"")
    server.files["/empty.mp4"] = (200, {"Content-Type": "video/mp4"}, b"")
    yield server
    server.close()


@dataclass(frozen=True)
class UrlRow:
    """A job whose video_url points at the media server, and its failure."""

    name: str
    url: Callable[[str], str]  # media server URL -> video_url
    message: str
    error_code: str = "DOWNLOAD_ERROR"


URL_ROWS = [
    UrlRow("empty body", lambda u: f"{u}/empty.mp4", "sent an empty body"),
    UrlRow(
        "404 with a token in the query",
        lambda u: f"{u}/missing.mp4?X-Amz-Signature={URL_TOKEN}&t=1",
        "answered HTTP 404",
    ),
    UrlRow(
        "password in the URL",
        lambda u: u.replace("http://", f"http://user:{URL_PASSWORD}@") + "/gone.mp4",
        "answered HTTP 404",
    ),
    UrlRow("declared size over the cap", lambda u: f"{u}/huge.mp4", "over the 4294967296-byte limit"),
]


@dataclass
class Submitted:
    jobs: dict[str, str]
    worker_pid: int


def worker_pid(stack_env: dict[str, str]) -> int:
    from celery import Celery

    import celeryconfig

    app = Celery("probe")
    app.config_from_object(celeryconfig)
    app.conf.broker_url = app.conf.result_backend = stack_env["ECG_REDIS_URL"]
    return int(app.send_task("ecg.worker_info", queue="model").get(timeout=300)["pid"])


@pytest.fixture(scope="module")
def submitted(
    api: httpx.Client,
    worker: Proc,
    stack_env: dict[str, str],
    media_server: MediaServer,
    ffmpeg: str,
    sample_wav: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Submitted:
    """Every media and URL job, submitted at once: the worker works while the request rows run."""
    tmp = tmp_path_factory.mktemp("hostile-media")
    wait_for_worker(api, worker)
    pid = worker_pid(stack_env)
    jobs: dict[str, str] = {}
    for row in MEDIA_ROWS:
        if row.make is None:
            video_url = "upload://" + uuid.uuid4().hex
        else:
            up = api.post("/api/uploads", content=row.make(tmp, ffmpeg, sample_wav))
            assert up.status_code == 201, (row.name, up.text)
            video_url = up.json()["video_url"]
        jobs[row.name] = _submit(api, video_url)
    for url_row in URL_ROWS:
        jobs[url_row.name] = _submit(api, url_row.url(media_server.url))
    return Submitted(jobs, pid)


def _submit(api: httpx.Client, video_url: str, **extra: Any) -> str:
    job_id = f"hostile-{uuid.uuid4().hex[:12]}"
    r = api.post(PROCESS, json={"job_id": job_id, "video_url": video_url, **extra})
    assert r.status_code == 202, (video_url, r.text)
    return job_id


def _assert_actionable_failure(st: dict[str, Any], code: str, phrase: str) -> None:
    assert st["status"] == "failed", st
    assert st["error_code"] == code, st
    message = st["error_message"] or ""
    assert phrase in message, st
    assert "Traceback" not in message and 'File "' not in message and len(message) < 400, message


@pytest.mark.parametrize("row", MEDIA_ROWS, ids=[r.name for r in MEDIA_ROWS])
def test_media_row(api: httpx.Client, worker: Proc, submitted: Submitted, row: MediaRow) -> None:
    st = wait_job(api, submitted.jobs[row.name], timeout=600)
    if row.status == "failed":
        assert row.error_code is not None and row.message is not None
        _assert_actionable_failure(st, row.error_code, row.message)
    else:
        assert st["status"] == "completed", st
        assert row.check is not None
        row.check(st["result"])
    assert worker.popen.poll() is None, worker.tail()


@pytest.mark.parametrize("row", URL_ROWS, ids=[r.name for r in URL_ROWS])
def test_url_row(api: httpx.Client, submitted: Submitted, row: UrlRow) -> None:
    st = wait_job(api, submitted.jobs[row.name], timeout=600)
    _assert_actionable_failure(st, row.error_code, row.message)
    text = json.dumps(st)
    assert URL_TOKEN not in text and URL_PASSWORD not in text, st


def test_good_job_after_the_table(
    api: httpx.Client,
    submitted: Submitted,
    media_server: MediaServer,
    receiver: Receiver,
    stack_env: dict[str, str],
    ffmpeg: str,
    sample_wav: Path,
    tmp_path: Path,
) -> None:
    """The worker that took the whole table serves a good job: same process, correct result.

    Its media URL and callback URL carry tokens, so that the log check after it has something to find.
    """
    speech = make_media(ffmpeg, sample_wav, tmp_path / "speech.wav", *SPEECH)
    media_server.files["/speech.wav"] = (200, {"Content-Type": "audio/wav"}, speech.read_bytes())
    job_id = _submit(
        api,
        f"{media_server.url}/speech.wav?X-Amz-Signature={URL_TOKEN}",
        callback_url=receiver.url(f"/cb?token={CALLBACK_TOKEN}"),
    )
    st = wait_job(api, job_id, timeout=600)
    assert st["status"] == "completed", st
    _speech_found(st["result"])
    assert URL_TOKEN not in json.dumps(st) and CALLBACK_TOKEN not in json.dumps(st)
    assert worker_pid(stack_env) == submitted.worker_pid, "the worker process was replaced during the table"
    receiver.wait_status(job_id, "completed")


def test_no_secret_in_any_log(
    worker: Proc, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """After the table and the good job: no key, signing key or URL token in the worker's or shim's log."""
    secrets = {
        "API key": API_KEY,
        "callback signing key": stack_env["ECG_CALLBACK_SIGNING_KEY"],
        "token in a media URL": URL_TOKEN,
        "password in a media URL": URL_PASSWORD,
        "token in a callback URL": CALLBACK_TOKEN,
    }
    shim_logs = list(tmp_path_factory.getbasetemp().glob("logs*/shim.log"))
    assert shim_logs, "the shim fixture's log was not found"
    texts = {log.name: log.read_text(errors="replace") for log in [worker.log, *shim_logs]}
    leaks = [
        f"{name}: {what}: {line[:300]}"
        for name, text in texts.items()
        for what, value in secrets.items()
        for line in text.splitlines()
        if value in line
    ]
    assert not leaks, "\n".join(leaks)
    assert "job_accepted" in "".join(texts[log.name] for log in shim_logs), "the shim log holds no job events"
    if "job_failed" not in texts[worker.log.name]:
        # The grep above saw only the worker's main process: the pool child, where stages run, logs
        # nothing. configure_logging() binds sys.stderr inside the child, where Celery has already
        # swapped it for a LoggingProxy; the root handler then writes into that proxy, whose
        # recursion guard drops every line. Until that is fixed this check cannot see stage logs.
        pytest.xfail("the worker's pool child writes no log lines (ecg_audio/logs.py vs Celery's stdout redirect)")
