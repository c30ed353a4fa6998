"""fetch_to_file against real servers started here on 127.0.0.1: HTTP, HTTPS, a moto S3, yt-dlp.

Host names like ``media.test`` resolve through a stub resolver to 127.0.0.1. The system
resolver knows nothing of them, so a fetch that succeeds proves the connection went to
the address the guard checked, not to a second lookup.
"""

from __future__ import annotations

import datetime
import http.server
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from media_io.fetch import FetchLimits, fetch_to_file
from media_io.urlguard import UrlPolicy, UrlRefused
from pipeline.errors import DownloadError

from .test_urlguard import stub_resolver

LOCAL = UrlPolicy(allowlist=("127.0.0.1",))
LIMITS = FetchLimits(max_bytes=1024 * 1024, timeout_s=5.0, max_redirects=5)
MEDIA = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40

Route = Callable[["Handler"], None]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: TestServer.HTTPD

    def do_GET(self) -> None:
        self.server.owner.requests.append((self.path, dict(self.headers)))
        route = self.server.owner.routes.get(self.path.split("?", 1)[0])
        if route is None:
            send(self, 404, b"not found", content_type="text/plain")
        else:
            route(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def send(
    h: Handler,
    status: int,
    body: bytes = b"",
    *,
    content_type: str = "application/octet-stream",
    headers: dict[str, str] | None = None,
) -> None:
    h.send_response(status)
    h.send_header("Content-Type", content_type)
    h.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        h.send_header(name, value)
    h.end_headers()
    h.wfile.write(body)


def redirect(location: str, status: int = 302) -> Route:
    return lambda h: send(h, status, headers={"Location": location})


def media(body: bytes = MEDIA, content_type: str = "video/mp4") -> Route:
    return lambda h: send(h, 200, body, content_type=content_type)


class TestServer:
    """A threaded HTTP(S) server on 127.0.0.1 that records connections and requests."""

    __test__ = False

    class HTTPD(http.server.ThreadingHTTPServer):
        daemon_threads = True
        owner: TestServer

        def get_request(self) -> tuple[socket.socket, Any]:
            sock, addr = super().get_request()
            self.owner.connections += 1
            if self.owner.tls is not None:
                sock = self.owner.tls.wrap_socket(sock, server_side=True)
            return sock, addr

    def __init__(self, routes: dict[str, Route], tls: ssl.SSLContext | None = None) -> None:
        self.routes = routes
        self.tls = tls
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.httpd = self.HTTPD(("127.0.0.1", 0), Handler)
        self.httpd.owner = self
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[..., TestServer]]:
    servers: list[TestServer] = []

    def start(routes: dict[str, Route], tls: ssl.SSLContext | None = None) -> TestServer:
        servers.append(TestServer(routes, tls))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def only_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# --- plain downloads ----------------------------------------------------------------------------


def test_downloads_media_atomically_with_progress(serve: Callable[..., TestServer], tmp_path: Path) -> None:
    server = serve({"/v/clip.mp4": media()})
    seen: list[int] = []
    path = fetch_to_file(server.url("/v/clip.mp4?sig=abc"), tmp_path, policy=LOCAL, limits=LIMITS, progress=seen.append)
    assert path == tmp_path / "input.mp4"
    assert path.read_bytes() == MEDIA
    assert seen[-1] == len(MEDIA)
    assert only_files(tmp_path) == ["input.mp4"]  # no temporary left behind
    assert server.requests[0][1]["Accept-Encoding"] == "identity"


def test_unknown_extension_gives_plain_input_name(serve: Callable[..., TestServer], tmp_path: Path) -> None:
    server = serve({"/download.php": media()})
    assert fetch_to_file(server.url("/download.php"), tmp_path, policy=LOCAL, limits=LIMITS).name == "input"


def test_connection_goes_to_the_checked_address(serve: Callable[..., TestServer], tmp_path: Path) -> None:
    server = serve({"/clip.wav": media(content_type="audio/wav")})
    resolve = stub_resolver({"media.test": ["127.0.0.1"]})
    path = fetch_to_file(
        server.url("/clip.wav", host="media.test"),
        tmp_path,
        policy=UrlPolicy(allowlist=("media.test",)),
        limits=LIMITS,
        resolve=resolve,
    )
    assert path.name == "input.wav"
    assert resolve.calls == ["media.test"]  # resolved once; nothing looked it up again
    assert server.requests[0][1]["Host"] == f"media.test:{server.port}"


def test_loopback_refused_by_default_without_any_connection(serve: Callable[..., TestServer], tmp_path: Path) -> None:
    server = serve({"/clip.mp4": media()})
    resolve = stub_resolver({"evil.example": ["127.0.0.1"]})
    for url in (server.url("/clip.mp4"), server.url("/clip.mp4", host="evil.example")):
        with pytest.raises(UrlRefused, match="loopback"):
            fetch_to_file(url, tmp_path, policy=UrlPolicy(), limits=LIMITS, resolve=resolve)
    assert server.connections == 0
    assert only_files(tmp_path) == []


# --- redirects ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{port}/secret",
        "http://[::ffff:127.0.0.1]:{port}/secret",
        "http://2130706433:{port}/secret",
        "http://169.254.169.254/latest/meta-data/",
        "file:///etc/passwd",
        "s3://bucket/key.wav",
        "gopher://127.0.0.1:{port}/",
    ],
)
def test_redirect_to_forbidden_target_is_refused_before_connecting(
    serve: Callable[..., TestServer], tmp_path: Path, target: str
) -> None:
    inner = serve({"/secret": media(b"internal")})
    outer = serve({"/start": redirect(target.format(port=inner.port))})
    resolve = stub_resolver({"outer.test": ["127.0.0.1"]})
    # Local files and s3 are allowed by this policy, yet never as a redirect target.
    policy = UrlPolicy(allowlist=("outer.test",), allow_local_files=True)
    with pytest.raises(UrlRefused, match="redirect from") as info:
        fetch_to_file(outer.url("/start", host="outer.test"), tmp_path, policy=policy, limits=LIMITS, resolve=resolve)
    assert info.value.retryable is False
    assert inner.connections == 0
    assert only_files(tmp_path) == []


def test_redirects_are_followed_and_rechecked(serve: Callable[..., TestServer], tmp_path: Path) -> None:
    second = serve({"/final/clip.webm": media(content_type="video/webm")})
    first = serve(
        {
            "/a": redirect("/b", 301),
            "/b": redirect(second.url("/final/clip.webm", host="cdn.test"), 307),
        }
    )
    resolve = stub_resolver({"site.test": ["127.0.0.1"], "cdn.test": ["127.0.0.1"]})
    path = fetch_to_file(
        first.url("/a", host="site.test"),
        tmp_path,
        policy=UrlPolicy(allowlist=("127.0.0.1",)),
        limits=LIMITS,
        resolve=resolve,
    )
    assert path.name == "input.webm" and path.read_bytes() == MEDIA
    assert resolve.calls == ["site.test", "site.test", "cdn.test"]  # each hop checked


def test_too_many_redirects(serve: Callable[..., TestServer], tmp_path: Path) -> None:
    server = serve({"/loop": redirect("/loop")})
    limits = FetchLimits(max_redirects=2, timeout_s=5.0)
    with pytest.raises(DownloadError, match="more than 2 redirects") as info:
        fetch_to_file(server.url("/loop"), tmp_path, policy=LOCAL, limits=limits)
    assert info.value.retryable is False
    assert len(server.requests) == 3


# --- limits, statuses, faults -------------------------------------------------------------------


def test_content_length_over_limit_aborts_before_reading(serve: Callable[..., TestServer], tmp_path: Path) -> None:
    server = serve({"/big.mp4": media(b"x" * 5000)})
    with pytest.raises(DownloadError, match="1000-byte limit") as info:
        fetch_to_file(server.url("/big.mp4"), tmp_path, policy=LOCAL, limits=FetchLimits(max_bytes=1000))
    assert info.value.retryable is False
    assert only_files(tmp_path) == []


def test_chunked_stream_over_limit_aborts(serve: Callable[..., TestServer], tmp_path: Path) -> None:
    sent: list[int] = []

    def chunked(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "video/mp4")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        try:
            for _ in range(200):
                h.wfile.write(b"3e8\r\n" + b"y" * 1000 + b"\r\n")
                h.wfile.flush()
                sent.append(1000)
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client hung up, as it should

    server = serve({"/stream.mp4": chunked})
    with pytest.raises(DownloadError, match="more than the 3000-byte limit") as info:
        fetch_to_file(server.url("/stream.mp4"), tmp_path, policy=LOCAL, limits=FetchLimits(max_bytes=3000))
    assert info.value.retryable is False
    assert only_files(tmp_path) == []


@pytest.mark.parametrize(
    ("status", "retryable"), [(404, False), (403, False), (410, False), (503, True), (500, True), (429, True)]
)
def test_http_status_decides_retry(
    serve: Callable[..., TestServer], tmp_path: Path, status: int, retryable: bool
) -> None:
    server = serve({"/clip.mp4": lambda h: send(h, status, b"nope", content_type="text/plain")})
    url = server.url("/clip.mp4?token=SECRET123").replace("http://", "http://alice:hunter2@")
    with pytest.raises(DownloadError, match=f"HTTP {status}") as info:
        fetch_to_file(url, tmp_path, policy=LOCAL, limits=LIMITS)
    assert info.value.retryable is retryable
    assert not isinstance(info.value, UrlRefused)
    for secret in ("alice", "hunter2", "SECRET123"):
        assert secret not in info.value.message
    assert server.requests[0][1]["Authorization"].startswith("Basic ")  # userinfo still works


def test_connection_refused_is_retryable(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError, match="network error") as info:
        fetch_to_file(f"http://127.0.0.1:{port}/clip.mp4", tmp_path, policy=LOCAL, limits=LIMITS)
    assert info.value.retryable is True


def test_read_timeout_is_retryable(serve: Callable[..., TestServer], tmp_path: Path) -> None:
    release = threading.Event()
    answered: list[bool] = []  # the server answers only once the test releases it

    def stall(h: Handler) -> None:
        release.wait(600)
        answered.append(True)

    server = serve({"/slow.mp4": stall})
    try:
        with pytest.raises(DownloadError, match="timed out") as info:
            fetch_to_file(server.url("/slow.mp4"), tmp_path, policy=LOCAL, limits=FetchLimits(timeout_s=0.3))
        assert answered == [], "the fetch ended because the server answered, not by its timeout"
    finally:
        release.set()
    assert info.value.retryable is True


# --- HTTPS: pinned address, certificate checked against the URL's host ------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fetch test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "media.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("media.test")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (out / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (out / "leaf.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return {"ca": out / "ca.pem", "cert": out / "leaf.pem", "key": out / "leaf.key"}


def tls_server(serve: Callable[..., TestServer], files: dict[str, Path], sni_seen: list[str | None]) -> TestServer:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files["cert"], files["key"])
    context.sni_callback = lambda sock, name, ctx: sni_seen.append(name)  # type: ignore[assignment,misc]
    return serve({"/clip.mp4": media()}, tls=context)


def test_https_pins_address_and_verifies_the_original_host(
    serve: Callable[..., TestServer], tls_files: dict[str, Path], tmp_path: Path
) -> None:
    sni: list[str | None] = []
    server = tls_server(serve, tls_files, sni)
    client_ctx = ssl.create_default_context(cafile=str(tls_files["ca"]))
    resolve = stub_resolver({"media.test": ["127.0.0.1"]})
    path = fetch_to_file(
        server.url("/clip.mp4", host="media.test", scheme="https"),
        tmp_path,
        policy=UrlPolicy(allowlist=("media.test",)),
        limits=LIMITS,
        resolve=resolve,
        ssl_context=client_ctx,
    )
    assert path.read_bytes() == MEDIA
    assert sni == ["media.test"]
    assert server.requests[0][1]["Host"] == f"media.test:{server.port}"


@pytest.mark.parametrize("host", ["127.0.0.1", "other.test"])
def test_https_certificate_for_another_name_is_rejected(
    serve: Callable[..., TestServer], tls_files: dict[str, Path], tmp_path: Path, host: str
) -> None:
    server = tls_server(serve, tls_files, [])
    resolve = stub_resolver({"other.test": ["127.0.0.1"]})
    with pytest.raises(DownloadError, match="TLS certificate rejected") as info:
        fetch_to_file(
            server.url("/clip.mp4", host=host, scheme="https"),
            tmp_path,
            policy=UrlPolicy(allowlist=("127.0.0.1",)),
            limits=LIMITS,
            resolve=resolve,
            ssl_context=ssl.create_default_context(cafile=str(tls_files["ca"])),
        )
    assert info.value.retryable is False
    assert server.requests == []


# --- local files ----------------------------------------------------------------------------------


def test_local_files_are_used_in_place(tmp_path: Path) -> None:
    source = tmp_path / "My Recording.m4a"
    source.write_bytes(MEDIA)
    dest = tmp_path / "job"
    policy = UrlPolicy(allow_local_files=True)
    assert fetch_to_file(str(source), dest, policy=policy, limits=LIMITS) == source
    assert fetch_to_file(source.as_uri(), dest, policy=policy, limits=LIMITS) == source
    assert not dest.exists()  # nothing copied
    for bad in (str(tmp_path), str(tmp_path / "missing.wav")):
        with pytest.raises(DownloadError) as info:
            fetch_to_file(bad, dest, policy=policy, limits=LIMITS)
        assert info.value.retryable is False
    with pytest.raises(UrlRefused):
        fetch_to_file(str(source), dest, policy=UrlPolicy(), limits=LIMITS)


# --- S3 against a moto server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_factory(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Callable[[], Any]:
    import boto3

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }.items():
        monkeypatch.setenv(name, value)

    def factory() -> Any:
        return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")

    client = factory()
    client.create_bucket(Bucket="media-in")
    client.put_object(Bucket="media-in", Key="jobs/7/clip.wav", Body=MEDIA)
    return factory


def test_s3_download(s3_factory: Callable[[], Any], tmp_path: Path) -> None:
    seen: list[int] = []
    path = fetch_to_file(
        "s3://media-in/jobs/7/clip.wav",
        tmp_path,
        policy=UrlPolicy(),
        limits=LIMITS,
        s3_client_factory=s3_factory,
        progress=seen.append,
    )
    assert path == tmp_path / "input.wav"
    assert path.read_bytes() == MEDIA
    assert seen[-1] == len(MEDIA)
    assert only_files(tmp_path) == ["input.wav"]


@pytest.mark.parametrize("url", ["s3://media-in/jobs/7/missing.wav", "s3://no-such-bucket/clip.wav"])
def test_s3_missing_object_is_not_retryable(s3_factory: Callable[[], Any], tmp_path: Path, url: str) -> None:
    with pytest.raises(DownloadError) as info:
        fetch_to_file(url, tmp_path, policy=UrlPolicy(), limits=LIMITS, s3_client_factory=s3_factory)
    assert info.value.retryable is False
    assert only_files(tmp_path) == []


def test_s3_object_over_limit(s3_factory: Callable[[], Any], tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="100-byte limit") as info:
        fetch_to_file(
            "s3://media-in/jobs/7/clip.wav",
            tmp_path,
            policy=UrlPolicy(),
            limits=FetchLimits(max_bytes=100),
            s3_client_factory=s3_factory,
        )
    assert info.value.retryable is False


def test_s3_without_client(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="S3 client") as info:
        fetch_to_file("s3://media-in/clip.wav", tmp_path, policy=UrlPolicy(), limits=LIMITS)
    assert info.value.retryable is False


# --- pages through yt-dlp -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_mp4(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real half-second mp4 made with ffmpeg."""
    import imageio_ffmpeg

    out = tmp_path_factory.mktemp("clip") / "clip.mp4"
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-loglevel", "error",
            "-f", "lavfi", "-i", "sine=frequency=440:duration=0.5:sample_rate=16000",
            "-c:a", "aac", "-b:a", "32k", str(out),
        ],
        check=True,
        timeout=60,
    )  # fmt: skip
    return out.read_bytes()


def page(video_src: str) -> Route:
    html = (
        "<!DOCTYPE html><html><head><title>A talk</title></head><body>"
        f'<video controls><source src="{video_src}" type="video/mp4"></video></body></html>'
    ).encode()
    return lambda h: send(h, 200, html, content_type="text/html; charset=utf-8")


def test_page_media_found_by_yt_dlp_and_fetched_through_the_guard(
    serve: Callable[..., TestServer], clip_mp4: bytes, tmp_path: Path
) -> None:
    server = serve({"/watch": page("/media/clip.mp4"), "/media/clip.mp4": media(clip_mp4)})
    resolve = stub_resolver({"page.test": ["127.0.0.1"]})
    path = fetch_to_file(
        server.url("/watch", host="page.test"),
        tmp_path,
        policy=UrlPolicy(allowlist=("page.test",)),
        limits=LIMITS,
        resolve=resolve,
    )
    assert path.name == "input.mp4"
    assert path.read_bytes() == clip_mp4
    # yt-dlp's own page request came through the guard too: only the stub knows page.test.
    assert [p for p, _ in server.requests].count("/watch") == 2
    assert set(resolve.calls) == {"page.test"}


def test_page_pointing_at_loopback_is_refused_without_connecting(
    serve: Callable[..., TestServer], clip_mp4: bytes, tmp_path: Path
) -> None:
    internal = serve({"/clip.mp4": media(clip_mp4)})
    server = serve({"/watch": page(internal.url("/clip.mp4"))})
    resolve = stub_resolver({"page.test": ["127.0.0.1"]})
    with pytest.raises(UrlRefused, match="127.0.0.1") as info:
        fetch_to_file(
            server.url("/watch", host="page.test"),
            tmp_path,
            policy=UrlPolicy(allowlist=("page.test",)),
            limits=LIMITS,
            resolve=resolve,
        )
    assert info.value.retryable is False
    assert internal.connections == 0


def test_page_without_media_is_not_retryable(serve: Callable[..., TestServer], tmp_path: Path) -> None:
    html = b"<html><head><title>nothing</title></head><body>no video here</body></html>"
    server = serve({"/empty": lambda h: send(h, 200, html, content_type="text/html")})
    with pytest.raises(DownloadError) as info:
        fetch_to_file(server.url("/empty"), tmp_path, policy=LOCAL, limits=LIMITS)
    assert info.value.retryable is False
    assert only_files(tmp_path) == []
