"""Fetch a job's input into a local file, under the URL policy of ``media_io.urlguard``.

Four kinds of input:

* a local path or ``file://`` URL (only where the policy allows local files): used in
  place, never copied;
* ``s3://bucket/key``: downloaded with the boto3 client the caller's factory builds;
* an http(s) URL that answers with media: streamed to disk;
* an http(s) URL that answers with an HTML page (a YouTube watch page, say): yt-dlp
  finds the media URL on it, and that URL is streamed like any other.

Every HTTP request, the ones yt-dlp makes included, goes through one guarded path:
the URL is checked and its host resolved once (``check_url``), the TCP connection is
made to one of those checked addresses and nowhere else, and redirects are followed
by hand, each ``Location`` checked before anything connects to it. The URL itself is
left alone, so the Host header, TLS SNI and certificate verification all use the
original host name: a pinned address can never weaken HTTPS.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import socket
import ssl
import stat
import tempfile
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpcore
import httpx

from media_io.s3_input import RETRYABLE_4XX, fetch_s3, media_filename
from media_io.urlguard import (
    CheckedUrl,
    Resolver,
    UrlPolicy,
    UrlRefused,
    check_url,
    file_url_path,
    redact_url,
)
from pipeline.errors import DownloadError

logger = logging.getLogger(__name__)

# A page handed to yt-dlp is read into memory; media never is.
MAX_PAGE_BYTES = 16 * 1024**2
USER_AGENT = "ecg-audio-analyzer/0.1 (media fetcher)"
# Progressive http(s) formats only: HLS and DASH manifests would need a downloader
# that fetches segment URLs outside this guard.
YTDLP_FORMAT = "bestaudio[protocol~='^https?$']/best[protocol~='^https?$']"

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_PAGE_TYPES = frozenset({"text/html", "application/xhtml+xml"})
_FORWARDED_MEDIA_HEADERS = frozenset({"user-agent", "accept", "accept-language", "referer", "origin"})
_CROSS_ORIGIN_DROPPED_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on one fetch.

    Attributes:
        max_bytes: largest input accepted, checked against Content-Length and the bytes streamed.
        timeout_s: connect, read and write timeout per network operation (not for the whole fetch:
            the task's soft time limit bounds that).
        max_redirects: redirects followed per request.
    """

    max_bytes: int = 4 * 1024**3
    timeout_s: float = 30.0
    max_redirects: int = 5


def fetch_to_file(
    url: str,
    dest_dir: Path,
    *,
    policy: UrlPolicy,
    limits: FetchLimits,
    s3_client_factory: Callable[[], Any] | None = None,
    progress: Callable[[int], None] | None = None,
    resolve: Resolver = socket.getaddrinfo,
    ssl_context: ssl.SSLContext | None = None,
) -> Path:
    """Bring the input named by ``url`` to a local file and return its path.

    Args:
        url: an http(s) or s3 URL, or (policy permitting) a local path or ``file://`` URL.
        dest_dir: where a downloaded file is written (``input`` or ``input.<media ext>``,
            replaced atomically). Local inputs are not copied here.
        policy: which URLs may be fetched.
        limits: size, timeout and redirect bounds.
        s3_client_factory: builds a boto3 S3 client (the caller sets endpoint_url,
            credentials and botocore timeouts); needed only for s3:// URLs.
        progress: called with the number of bytes written so far.
        resolve: ``getaddrinfo``-shaped resolver (tests pass a stub).
        ssl_context: trust store for https (None: certifi's, as httpx uses by default).

    Returns:
        The local file: ``url``'s own path for local input, else a new file in ``dest_dir``.

    Raises:
        UrlRefused: the URL, a redirect target or a media URL found on a page is not allowed.
        DownloadError: the fetch failed; ``retryable`` says whether trying again may help.
    """
    checked = check_url(url, policy, resolve=resolve)
    if checked.scheme == "file":
        return _local_file(checked)
    dest_dir.mkdir(parents=True, exist_ok=True)
    if checked.scheme == "s3":
        return fetch_s3(checked, dest_dir, limits.max_bytes, s3_client_factory, progress)
    http = GuardedHttp(policy=policy, limits=limits, resolve=resolve, ssl_context=ssl_context)
    return _fetch_http(http, checked, dest_dir, progress)


# --- guarded HTTP --------------------------------------------------------------------------------


class _PinnedBackend(httpcore.NetworkBackend):
    """Opens TCP connections only to the addresses ``check_url`` validated for one host and port."""

    def __init__(self, checked: CheckedUrl) -> None:
        self._host = checked.host
        self._port = checked.port
        self._addresses = checked.addresses
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        # httpcore asks for the URL's host; anything but the checked host and port is a bug
        # (or a parser disagreement between urllib and httpx): fail closed.
        if host.lower() != self._host or port != self._port or not self._addresses:
            raise httpcore.ConnectError(f"connection to {host!r} port {port} was not checked; refused")
        last_error: Exception | None = None
        for address in self._addresses:
            try:
                return self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                last_error = e
        raise last_error or httpcore.ConnectError("no checked address to connect to")

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are never used by the fetcher")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _PinnedTransport(httpx.HTTPTransport):
    """httpx's own transport (request mapping, error mapping, TLS) over a pinned network backend.

    httpx 0.28 takes no network backend, so the connection pool it builds is replaced with an
    identical one that has ours. If httpx ever stops keeping its pool there, this refuses to
    work rather than connect unpinned.
    """

    def __init__(self, checked: CheckedUrl, ssl_context: ssl.SSLContext) -> None:
        super().__init__(verify=ssl_context, trust_env=False, retries=0)
        if not isinstance(getattr(self, "_pool", None), httpcore.ConnectionPool):
            raise RuntimeError("httpx.HTTPTransport internals changed; cannot pin connections, refusing")
        self._pool.close()
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context, max_connections=4, retries=0, network_backend=_PinnedBackend(checked)
        )


class GuardedHttp:
    """HTTP requests under a URL policy: checked, pinned, redirects followed by hand."""

    def __init__(
        self,
        *,
        policy: UrlPolicy,
        limits: FetchLimits,
        resolve: Resolver = socket.getaddrinfo,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.policy = policy
        self.limits = limits
        self.resolve = resolve
        self._ssl_context = ssl_context or httpx.create_ssl_context()

    def check(self, url: str) -> CheckedUrl:
        """Check a URL this object is asked to request: http(s) only, whatever else the policy allows."""
        scheme = url.partition(":")[0].lower()
        if scheme not in ("http", "https"):
            raise UrlRefused(f"only http(s) may be requested here, not {redact_url(url)!r}; refused")
        return check_url(url, self.policy, resolve=self.resolve)

    @contextlib.contextmanager
    def open(
        self,
        checked: CheckedUrl,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        content: Any = None,
    ) -> Iterator[tuple[CheckedUrl, httpx.Response]]:
        """Send a request and yield ``(final checked URL, streaming response)`` after redirects.

        The response may have any status but a redirect; its body is not read yet. Network
        faults, here and while the caller reads the body, become ``DownloadError``.
        """
        request_headers = dict(headers or {})
        current = checked
        try:
            for _ in range(self.limits.max_redirects + 1):
                with self._client(current) as client:
                    request = client.build_request(method, current.url, headers=request_headers, content=content)
                    response = client.send(request, stream=True, follow_redirects=False)
                    try:
                        if response.status_code not in _REDIRECT_STATUSES:
                            yield current, response
                            return
                        target = self._redirect_target(current, response)
                    finally:
                        response.close()
                if response.status_code == 303 or (response.status_code in (301, 302) and method == "POST"):
                    method, content = ("HEAD" if method == "HEAD" else "GET"), None
                if (target.scheme, target.host, target.port) != (current.scheme, current.host, current.port):
                    request_headers = {
                        k: v for k, v in request_headers.items() if k.lower() not in _CROSS_ORIGIN_DROPPED_HEADERS
                    }
                current = target
        except httpx.TimeoutException as e:
            raise DownloadError(
                f"timed out ({type(e).__name__}, limit {self.limits.timeout_s:g} s) fetching {redact_url(current.url)}",
                retryable=True,
            ) from e
        except httpx.RequestError as e:
            # A certificate that does not verify, or a body that does not decode, will not get better.
            permanent = _is_certificate_error(e) or isinstance(e, httpx.DecodingError)
            raise DownloadError(
                f"{'TLS certificate rejected' if _is_certificate_error(e) else 'network error'} fetching "
                f"{redact_url(current.url)}: {type(e).__name__}: {_short(e)}",
                retryable=not permanent,
            ) from e
        raise DownloadError(
            f"more than {self.limits.max_redirects} redirects fetching {redact_url(checked.url)}; gave up",
            retryable=False,
        )

    def _redirect_target(self, current: CheckedUrl, response: httpx.Response) -> CheckedUrl:
        location = response.headers.get("location")
        if not location:
            raise DownloadError(
                f"{redact_url(current.url)} answered {response.status_code} without a Location",
                retryable=False,
            )
        target_url = urljoin(current.url, location)
        try:
            return self.check(target_url)
        except UrlRefused as e:
            raise UrlRefused(f"redirect from {redact_url(current.url)} refused: {e.message}") from None

    def _client(self, checked: CheckedUrl) -> httpx.Client:
        return httpx.Client(
            transport=_PinnedTransport(checked, self._ssl_context),
            timeout=httpx.Timeout(self.limits.timeout_s),
            follow_redirects=False,
            trust_env=False,  # no env proxies, no .netrc credentials sent to arbitrary hosts
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        )


def _fetch_http(
    http: GuardedHttp,
    checked: CheckedUrl,
    dest_dir: Path,
    progress: Callable[[int], None] | None,
    *,
    headers: dict[str, str] | None = None,
    allow_page: bool = True,
    ext_hint: str | None = None,
) -> Path:
    with http.open(checked, headers=headers) as (final, response):
        _raise_for_status(final, response)
        media_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type not in _PAGE_TYPES:
            name = media_filename(ext_hint, final.url, checked.url)
            return _save_stream(response, final, dest_dir / name, http.limits.max_bytes, progress)
        if not allow_page:
            raise DownloadError(
                f"media URL {redact_url(final.url)} answered with an HTML page, not media", retryable=False
            )
    media_url, media_headers, ext = _extract_media_url(http, final)
    media = http.check(media_url)
    logger.info("page %s: media at %s", redact_url(final.url), redact_url(media.url))
    return _fetch_http(http, media, dest_dir, progress, headers=media_headers, allow_page=False, ext_hint=ext)


def _raise_for_status(checked: CheckedUrl, response: httpx.Response) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    retryable = status >= 500 or status in RETRYABLE_4XX
    raise DownloadError(
        f"{redact_url(checked.url)} answered HTTP {status} {response.reason_phrase}".rstrip(),
        retryable=retryable,
    )


def _save_stream(
    response: httpx.Response,
    checked: CheckedUrl,
    target: Path,
    max_bytes: int,
    progress: Callable[[int], None] | None,
) -> Path:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise DownloadError(
            f"{redact_url(checked.url)} is {int(declared)} bytes, over the {max_bytes}-byte limit",
            retryable=False,
        )
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix="-" + target.name)
    tmp = Path(tmp_name)
    try:
        written = 0
        with os.fdopen(fd, "wb") as fh:
            # iter_bytes, not iter_raw: were a server to compress despite "identity", the file
            # must hold the media itself; counting decoded bytes also bounds a compression bomb.
            for chunk in response.iter_bytes():
                written += len(chunk)
                if written > max_bytes:
                    raise DownloadError(
                        f"{redact_url(checked.url)} sent more than the {max_bytes}-byte limit; aborted",
                        retryable=False,
                    )
                fh.write(chunk)
                if progress is not None:
                    progress(written)
            fh.flush()
            os.fsync(fh.fileno())
        if written == 0:
            raise DownloadError(f"{redact_url(checked.url)} sent an empty body", retryable=False)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _read_capped(response: httpx.Response, checked: CheckedUrl, cap: int) -> bytes:
    buffer = bytearray()
    for chunk in response.iter_bytes():
        buffer += chunk
        if len(buffer) > cap:
            raise DownloadError(f"page {redact_url(checked.url)} is larger than {cap} bytes; not read", retryable=False)
    return bytes(buffer)


def _is_certificate_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _short(exc: BaseException) -> str:
    return _scrub_urls(str(exc).splitlines()[0] if str(exc) else "")[:200]


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _scrub_urls(text: str) -> str:
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


# --- local files and S3 --------------------------------------------------------------------------


def _local_file(checked: CheckedUrl) -> Path:
    path = file_url_path(checked)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DownloadError(f"local file {redact_url(str(path))} does not exist", retryable=False) from None
    except OSError as e:
        raise DownloadError(f"local file {redact_url(str(path))} cannot be read: {e.strerror}", retryable=False) from e
    if not stat.S_ISREG(mode):
        raise DownloadError(f"{redact_url(str(path))} is not a regular file", retryable=False)
    return path


# --- pages: yt-dlp, with every request it makes sent through GuardedHttp --------------------------


def _extract_media_url(http: GuardedHttp, page: CheckedUrl) -> tuple[str, dict[str, str], str | None]:
    """Ask yt-dlp for the media URL on ``page``; returns (url, headers to send, extension)."""
    youtube_dl_class, handler_class = _yt_dlp_classes()
    handler_errors: list[DownloadError] = []
    params = {
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "noplaylist": True,
        "playlist_items": "1:2",
        "skip_download": True,
        "cachedir": False,
        "check_formats": False,
        "format": YTDLP_FORMAT,
        "socket_timeout": http.limits.timeout_s,
        "logger": _YtDlpLog(),
    }
    factory = functools.partial(handler_class, http=http, errors=handler_errors)
    try:
        with youtube_dl_class(params, handler_factory=factory) as ydl:
            info = ydl.extract_info(page.url, download=False)
    except Exception as e:
        # yt-dlp's own errors quote URLs whole (tokens included), so they are neither chained
        # nor quoted here; what our guard saw explains the failure better anyway.
        logger.debug("yt-dlp failed on %s: %s", redact_url(page.url), _short(e))
        refusals = [err for err in handler_errors if isinstance(err, UrlRefused)]
        if refusals:
            raise refusals[0] from None
        if handler_errors:
            raise handler_errors[-1] from None
        raise DownloadError(
            f"no downloadable media found on page {redact_url(page.url)}: {_short(e)}", retryable=False
        ) from None
    if info.get("_type") == "playlist":
        entries = [entry for entry in info.get("entries") or [] if entry]
        if len(entries) != 1:
            raise DownloadError(
                f"page {redact_url(page.url)} holds several videos; give the URL of one", retryable=False
            )
        info = entries[0]
    media_url = info.get("url")
    protocol = info.get("protocol", "")
    if not media_url or protocol not in ("http", "https"):
        raise DownloadError(
            f"page {redact_url(page.url)} offers no progressive http(s) media (protocol {protocol!r})",
            retryable=False,
        )
    headers = {
        str(k): str(v)
        for k, v in (info.get("http_headers") or {}).items()
        if str(k).lower() in _FORWARDED_MEDIA_HEADERS
    }
    return str(media_url), headers, info.get("ext")


class _YtDlpLog:
    """yt-dlp's logger protocol, quietened and with URLs redacted."""

    def debug(self, msg: str) -> None:
        logger.debug("yt-dlp: %s", _scrub_urls(msg))

    def info(self, msg: str) -> None:
        logger.debug("yt-dlp: %s", _scrub_urls(msg))

    def warning(self, msg: str) -> None:
        logger.info("yt-dlp warning: %s", _scrub_urls(msg))

    def error(self, msg: str) -> None:
        logger.info("yt-dlp error: %s", _scrub_urls(msg))


@functools.lru_cache(maxsize=1)
def _yt_dlp_classes() -> tuple[Any, Any]:
    """yt-dlp subclasses, built on first use so importing this module does not import yt-dlp."""
    try:
        import yt_dlp
        from yt_dlp.networking.common import RequestHandler
        from yt_dlp.networking.common import Response as YtResponse
        from yt_dlp.networking.exceptions import HTTPError, TransportError
    except ImportError as e:
        raise RuntimeError("page URLs (e.g. YouTube) require yt-dlp (pip install yt-dlp)") from e

    class GuardedRH(RequestHandler):  # type: ignore[misc]  # yt-dlp wants the "RH" suffix
        """A yt-dlp request handler that sends everything through ``GuardedHttp``."""

        _SUPPORTED_URL_SCHEMES = ("http", "https")
        _SUPPORTED_PROXY_SCHEMES = None  # proxies are ignored: requests go out only via the guard
        _SUPPORTED_FEATURES = None

        def __init__(self, *, http: GuardedHttp, errors: list[DownloadError], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._http = http
            self._errors = errors

        def _check_extensions(self, extensions: dict[str, Any]) -> None:
            super()._check_extensions(extensions)
            for name in ("cookiejar", "timeout", "legacy_ssl", "keep_header_casing"):
                extensions.pop(name, None)

        def _send(self, request: Any) -> Any:
            headers = dict(self._get_headers(request))
            cookie = self._get_cookiejar(request).get_cookie_header(request.url)
            if cookie:
                headers["Cookie"] = cookie
            headers["Accept-Encoding"] = "gzip, deflate"  # what httpx can always decode
            try:
                checked = self._http.check(request.url)
                with self._http.open(checked, method=request.method, headers=headers, content=request.data) as (
                    final,
                    response,
                ):
                    body = _read_capped(response, final, MAX_PAGE_BYTES)
                    status = response.status_code
                    reply_headers = {
                        k: v
                        for k, v in response.headers.items()
                        if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
                    }
            except DownloadError as e:
                self._errors.append(e)
                raise TransportError(e.message) from None
            reply = YtResponse(io.BytesIO(body), final.url, reply_headers, status=status)
            if not 200 <= status < 300:
                raise HTTPError(reply)
            return reply

    class GuardedYoutubeDL(yt_dlp.YoutubeDL):  # type: ignore[misc]
        """YoutubeDL whose only request handler is ``GuardedRH``."""

        def __init__(self, params: dict[str, Any], *, handler_factory: Callable[..., Any]) -> None:
            self._handler_factory = handler_factory
            super().__init__(params)

        def build_request_director(self, handlers: Any, preferences: Any = None) -> Any:
            return super().build_request_director([self._handler_factory], None)

    return GuardedYoutubeDL, GuardedRH
