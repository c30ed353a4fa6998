"""Fetch a job's input into a local file, under the URL policy of ``media_io.urlguard``.

Four kinds of input:

* a local path or ``file://`` URL (only where the policy allows local files): used in
  place, never copied;
* ``s3://bucket/key``: downloaded with the boto3 client the caller's factory builds;
* an http(s) URL that answers with media: streamed to disk;
* an http(s) URL that answers with an HTML page (a YouTube watch page, say): yt-dlp
  finds the media URL on it, and that URL is streamed like any other.

Every HTTP request, the ones yt-dlp makes included, goes through one guarded path,
``media_io.http.GuardedHttp`` (checked, pinned to the checked addresses, redirects
followed by hand).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import socket
import ssl
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from media_io.http import FetchLimits, GuardedHttp, _scrub_urls, _short
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
# Progressive http(s) formats only: HLS and DASH manifests would need a downloader
# that fetches segment URLs outside this guard.
YTDLP_FORMAT = "bestaudio[protocol~='^https?$']/best[protocol~='^https?$']"

_PAGE_TYPES = frozenset({"text/html", "application/xhtml+xml"})
_FORWARDED_MEDIA_HEADERS = frozenset({"user-agent", "accept", "accept-language", "referer", "origin"})




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
