"""Guarded HTTP: every request the fleet makes to a URL someone gave it (media downloads, pages, callbacks).

The URL is checked under the URL policy and its host resolved once (``check_url``); the TCP
connection is made to one of those checked addresses and nowhere else; redirects are followed by
hand, each ``Location`` checked before anything connects to it. The URL itself is left alone, so
the Host header, TLS SNI and certificate verification all use the original host name: a pinned
address can never weaken HTTPS. ``GuardedHttp.open`` is the blocking path (downloads, yt-dlp);
``GuardedHttp.post_async`` the asyncio one the callback dispatchers use, whose whole request a
caller can bound (``asyncio.timeout``): cancelling it closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import httpcore
import httpx

from media_io.urlguard import CheckedUrl, Resolver, UrlPolicy, UrlRefused, check_url, redact_url
from pipeline.errors import DownloadError

USER_AGENT = "ecg-audio-analyzer/0.1 (media fetcher)"
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
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


# --- the asyncio path (callbacks) ----------------------------------------------------------------


class _AsyncPinnedBackend(httpcore.AsyncNetworkBackend):
    """``_PinnedBackend`` for asyncio: connects only to the checked addresses of one host and port."""

    def __init__(self, checked: CheckedUrl) -> None:
        self._host = checked.host
        self._port = checked.port
        self._addresses = checked.addresses
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if host.lower() != self._host or port != self._port or not self._addresses:
            raise httpcore.ConnectError(f"connection to {host!r} port {port} was not checked; refused")
        last_error: Exception | None = None
        for address in self._addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                last_error = e
        raise last_error or httpcore.ConnectError("no checked address to connect to")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are never used here")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _AsyncPinnedTransport(httpx.AsyncHTTPTransport):
    """``_PinnedTransport`` for asyncio (the same pool replacement, the same refusal if it cannot)."""

    def __init__(self, checked: CheckedUrl, ssl_context: ssl.SSLContext) -> None:
        super().__init__(verify=ssl_context, trust_env=False, retries=0)
        if not isinstance(getattr(self, "_pool", None), httpcore.AsyncConnectionPool):
            raise RuntimeError("httpx.AsyncHTTPTransport internals changed; cannot pin connections, refusing")
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context, max_connections=1, retries=0, network_backend=_AsyncPinnedBackend(checked)
        )


async def post_async(
    http: GuardedHttp, url: str, body: bytes, headers: dict[str, str], timeout_s: float
) -> tuple[int, httpx.Headers]:
    """One POST through the guard, redirects not followed, the answer's body never read.

    A host that does not resolve (NXDOMAIN included: a receiver restarting behind Docker's DNS) is
    a ``httpx.ConnectError``, which callers retry; a URL the policy refuses is ``UrlRefused``
    (final). Cancelling the coroutine (a caller's deadline) closes the connection at once.
    """
    try:
        checked = await asyncio.to_thread(http.check, url)  # getaddrinfo blocks; its own timeout bounds it
    except UrlRefused:
        raise
    except DownloadError as e:
        raise httpx.ConnectError(e.message) from e
    async with (
        httpx.AsyncClient(
            transport=_AsyncPinnedTransport(checked, http._ssl_context),
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
            trust_env=False,
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        ) as client,
        client.stream("POST", checked.url, content=body, headers=headers) as response,
    ):
        return response.status_code, response.headers
