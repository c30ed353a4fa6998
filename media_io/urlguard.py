"""Which input URLs a worker may fetch: the guard against server-side request forgery.

A job names a media URL that a worker downloads from inside our network, so a URL
is a request we make on someone else's behalf. ``check_url`` decides, before any
connection is made, whether that request is allowed: the scheme is one we fetch,
the text is sane, and every address the host resolves to is a public one (unless
the policy allow-lists it). The host is resolved exactly once, here; the fetcher
then connects to the addresses in the returned ``CheckedUrl`` and nowhere else,
so a DNS answer that changes between check and connect (DNS rebinding) gains
nothing.

Messages never carry credentials: ``redact_url`` drops ``user:pass@`` and the
values of query parameters (presigned URLs carry their signature there).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

from pipeline.errors import DownloadError

MAX_URL_LENGTH = 2048
DEFAULT_PORTS = {"http": 80, "https": 443}

# getaddrinfo-shaped: (host, port) -> [(family, type, proto, canonname, sockaddr), ...]
Resolver = Callable[[str, int], Sequence[tuple[Any, ...]]]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 6052 well-known NAT64 prefix, and RFC 8215 local-use NAT64 prefix.
_NAT64_WKP = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_S3_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_S3_KEY_MAX_BYTES = 1024


@dataclass(frozen=True)
class UrlPolicy:
    """What a caller may fetch.

    Attributes:
        allowed_schemes: network schemes accepted (``file`` is governed by ``allow_local_files``).
        allow_private: accept loopback, private, link-local, multicast, reserved and
            unspecified addresses (a developer box; never the public shim).
        allowlist: host names, IP addresses or CIDR networks accepted even when private,
            e.g. ``("minio.internal", "10.0.0.0/8")``. A host name entry allows whatever
            that name resolves to; an address or network entry allows those addresses
            whatever name led to them.
        allow_local_files: accept plain paths and ``file://`` URLs (the CLI, not the shim).
        s3_inputs: where ``s3://`` URLs may point, as ``bucket`` or ``bucket/key-prefix``
            entries; None = anywhere (library use); () = nowhere.
        s3_denied: ``bucket/key-prefix`` entries refused whatever ``s3_inputs`` says (the
            workspace's ``temp/``, ``output/`` and ``uploads/``: other jobs' data).
    """

    allowed_schemes: frozenset[str] = frozenset({"https", "http", "s3"})
    allow_private: bool = False
    allowlist: tuple[str, ...] = ()
    allow_local_files: bool = False
    s3_inputs: tuple[str, ...] | None = None
    s3_denied: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.allowlist, tuple):
            raise ValueError("UrlPolicy.allowlist is a tuple of strings")
        _parse_allowlist(self.allowlist)  # fail at construction on a malformed entry


@dataclass(frozen=True)
class CheckedUrl:
    """A URL that passed ``check_url``.

    ``host`` is the lower-case ASCII host (the bucket for ``s3``, None for local files);
    ``port`` the effective TCP port for http(s), else None; ``addresses`` the resolved
    and checked IPs, the only ones a fetcher may connect to (empty for s3 and files).
    """

    url: str
    scheme: str
    host: str | None
    port: int | None
    addresses: tuple[str, ...]


class UrlRefused(DownloadError):
    """The URL is not one we fetch under the policy: bad input, never retried."""

    retryable = False


def redact_url(url: str, *, max_length: int = 200) -> str:
    """A URL fit for messages and logs: no userinfo, no query values, no fragment, no control characters."""
    text = str(url)
    try:
        parts = urlsplit(text)
        if parts.scheme and parts.netloc:
            netloc = parts.netloc
            if "@" in netloc:
                netloc = "***@" + netloc.rpartition("@")[2]
            query = "&".join((pair.split("=", 1)[0] + "=***") if pair else "" for pair in parts.query.split("&"))
            text = urlunsplit((parts.scheme, netloc, parts.path, query if parts.query else "", ""))
        elif "@" in text and ":" in text.split("@", 1)[0]:
            text = "***@" + text.rpartition("@")[2]
    except ValueError:
        return "<unparsable URL>"
    # Escape what could forge a log line or hide text (CR, LF, bidi overrides).
    cleaned = "".join(_escape_char(ch) if ch != " " and _is_bad_char(ch) else ch for ch in text)
    if len(cleaned) > max_length:
        cleaned = cleaned[: max_length - 1] + "…"
    return cleaned


def check_url(url: str, policy: UrlPolicy, *, resolve: Resolver = socket.getaddrinfo) -> CheckedUrl:
    """Check ``url`` against ``policy``, resolving its host once.

    Args:
        url: what the job asked for: an http(s) or s3 URL, or (policy permitting) a local path.
        policy: what may be fetched.
        resolve: ``getaddrinfo``-shaped resolver, called as ``resolve(host, port)``.

    Returns:
        The checked URL with the addresses a fetcher must connect to.

    Raises:
        UrlRefused: the URL is malformed or not allowed (never retryable).
        DownloadError: the host name did not resolve (retryable only for a temporary DNS failure).
    """
    if not isinstance(url, str) or not url:
        raise UrlRefused("URL is empty")
    if len(url) > MAX_URL_LENGTH:
        raise UrlRefused(f"URL is {len(url)} characters long; at most {MAX_URL_LENGTH} are accepted")
    if any(_is_bad_char(ch) and ch != " " for ch in url):
        raise UrlRefused(f"URL {redact_url(url)!r} contains whitespace or control characters; refused")

    scheme, sep, _ = url.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) or len(scheme) == 1:
        # No scheme (a one-letter "scheme" would be a Windows drive letter): a local path,
        # where a space is an ordinary character ("My Recording.m4a").
        return _check_local_path(url, policy)
    if " " in url:
        raise UrlRefused(f"URL {redact_url(url)!r} contains whitespace or control characters; refused")
    if "\\" in url:
        # Browsers and some parsers read '\' as '/', others do not: a classic parser-confusion trick.
        raise UrlRefused(f"URL {redact_url(url)!r} contains a backslash; refused")
    scheme = scheme.lower()
    if scheme == "file":
        return _check_file_url(url, policy)
    if scheme not in policy.allowed_schemes:
        allowed = ", ".join(sorted(policy.allowed_schemes)) or "none"
        raise UrlRefused(f"URL scheme {scheme!r} is not accepted (accepted: {allowed}); refused")
    if scheme == "s3":
        checked = _check_s3_url(url)
        _check_s3_scope(checked, policy)
        return checked
    if scheme not in DEFAULT_PORTS:
        raise UrlRefused(f"URL scheme {scheme!r} is not one this fetcher speaks; refused")
    return _check_http_url(url, scheme, policy, resolve)


def address_problem(address: IPAddress) -> str | None:
    """Why ``address`` is not a public unicast address (e.g. "a loopback address"), or None if it is.

    Addresses that embed an IPv4 address (IPv4-mapped, 6to4, Teredo, NAT64) are judged
    by the embedded address too, since that is where the packets end up.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded: list[tuple[str, ipaddress.IPv4Address]] = []
        if address.ipv4_mapped is not None:
            embedded.append(("an IPv4-mapped", address.ipv4_mapped))
        if address.sixtofour is not None:
            embedded.append(("a 6to4", address.sixtofour))
        if address.teredo is not None:
            server, client = address.teredo
            embedded += [("a Teredo", server), ("a Teredo", client)]
        if address in _NAT64_WKP:
            embedded.append(("a NAT64", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)))
        for kind, v4 in embedded:
            inner = address_problem(v4)
            if inner is not None:
                return f"{kind} form of {v4}, {inner}"
        if address in _NAT64_LOCAL:
            return "a local-use NAT64 address"
        if address.is_site_local:
            return "a site-local address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_private:
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        return "a non-global address"
    return None


# --- internals ---------------------------------------------------------------------------------


def _is_bad_char(ch: str) -> bool:
    # Cc (controls), Cf (bidi overrides, zero-width), Cs/Co/Cn, and any whitespace.
    return ch.isspace() or unicodedata.category(ch).startswith("C")


def _escape_char(ch: str) -> str:
    return f"%{ord(ch):02X}" if ord(ch) < 0x100 else "?"


@functools.lru_cache(maxsize=64)
def _parse_allowlist(entries: tuple[str, ...]) -> tuple[frozenset[str], tuple[IPNetwork, ...]]:
    names: set[str] = set()
    networks: list[IPNetwork] = []
    if isinstance(entries, str):
        raise ValueError("UrlPolicy.allowlist is a tuple of strings, not one string")
    for entry in entries:
        text = entry.strip().lower().rstrip(".")
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
            continue
        except ValueError:
            pass
        if not _HOSTNAME_RE.match(text):
            raise ValueError(f"UrlPolicy.allowlist entry {entry!r} is neither a host name, an IP nor a CIDR")
        names.add(text)
    return frozenset(names), tuple(networks)


def _allowlisted(host: str, address: IPAddress, policy: UrlPolicy) -> bool:
    names, networks = _parse_allowlist(policy.allowlist)
    if host in names:
        return True
    candidates: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    return any(c.version == n.version and c in n for c in candidates for n in networks)


def _check_local_path(url: str, policy: UrlPolicy) -> CheckedUrl:
    if url.startswith("//"):
        raise UrlRefused(f"URL {redact_url(url)!r} has no scheme; refused")
    if not policy.allow_local_files:
        raise UrlRefused(f"{redact_url(url)!r} is not a URL with a scheme (local files are not accepted here); refused")
    return CheckedUrl(url=url, scheme="file", host=None, port=None, addresses=())


def _check_file_url(url: str, policy: UrlPolicy) -> CheckedUrl:
    if not policy.allow_local_files:
        raise UrlRefused("file:// URLs are not accepted here; refused")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise UrlRefused(f"file:// URL names host {parts.netloc!r}; only local files are accepted; refused")
    if parts.query or parts.fragment or not parts.path:
        raise UrlRefused(f"file:// URL {redact_url(url)!r} must be file:///absolute/path; refused")
    return CheckedUrl(url=url, scheme="file", host=None, port=None, addresses=())


def file_url_path(checked: CheckedUrl) -> Path:
    """The local path a checked ``file`` URL or plain path names."""
    if checked.scheme != "file":
        raise ValueError(f"not a local file: scheme {checked.scheme!r}")
    if checked.url.lower().startswith("file:"):
        from urllib.request import url2pathname

        return Path(url2pathname(urlsplit(checked.url).path))
    return Path(checked.url)


def _check_s3_url(url: str) -> CheckedUrl:
    # s3:// URLs follow the AWS CLI convention: the key is raw text, not percent-encoded,
    # so split by hand rather than with a URL parser that would cut at '?' or '#'.
    rest = url[len("s3://") :] if url[:5].lower() == "s3://" else None
    if rest is None:
        raise UrlRefused(f"s3 URL {redact_url(url)!r} must look like s3://bucket/key; refused")
    bucket, slash, key = rest.partition("/")
    if not slash or not key:
        raise UrlRefused(f"s3 URL {redact_url(url)!r} names no object key; expected s3://bucket/key")
    problem = _s3_bucket_problem(bucket)
    if problem:
        raise UrlRefused(f"s3 bucket name {bucket[:70]!r} {problem}; refused")
    if len(key.encode("utf-8", "surrogatepass")) > _S3_KEY_MAX_BYTES:
        raise UrlRefused(f"s3 object key is longer than {_S3_KEY_MAX_BYTES} bytes; refused")
    if key.endswith("/"):
        raise UrlRefused(f"s3 URL {redact_url(url)!r} names a folder, not an object; refused")
    return CheckedUrl(url=url, scheme="s3", host=bucket, port=None, addresses=())


def _s3_matches(entry: str, bucket: str, key: str) -> bool:
    b, _, prefix = entry.partition("/")
    return b == bucket and key.startswith(prefix)


def _check_s3_scope(checked: CheckedUrl, policy: UrlPolicy) -> None:
    """Refuse objects outside the input locations, before any S3 call. One message for every refusal,
    so that it never tells an object that exists from one that is forbidden."""
    bucket, key = s3_bucket_and_key(checked)
    denied = any(_s3_matches(e, bucket, key) for e in policy.s3_denied)
    allowed = policy.s3_inputs is None or any(_s3_matches(e, bucket, key) for e in policy.s3_inputs)
    if denied or not allowed:
        raise UrlRefused(f"s3 URL {redact_url(checked.url)!r} is not in an allowed input location; refused")


def s3_bucket_and_key(checked: CheckedUrl) -> tuple[str, str]:
    """Bucket and key of a checked ``s3`` URL."""
    if checked.scheme != "s3" or checked.host is None:
        raise ValueError(f"not an s3 URL: scheme {checked.scheme!r}")
    return checked.host, checked.url[len("s3://") :].partition("/")[2]


def _s3_bucket_problem(bucket: str) -> str | None:
    if not _S3_BUCKET_RE.match(bucket):
        return "must be 3-63 lower-case letters, digits, '.' or '-', starting and ending alphanumeric"
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return "has an empty or malformed label"
    try:
        ipaddress.IPv4Address(bucket)
    except ValueError:
        return None
    return "is formatted as an IP address"


def _check_http_url(url: str, scheme: str, policy: UrlPolicy, resolve: Resolver) -> CheckedUrl:
    try:
        parts: SplitResult = urlsplit(url)
        explicit_port = parts.port
    except ValueError as e:
        raise UrlRefused(f"URL {redact_url(url)!r} is malformed ({_first_line(e)}); refused") from None
    if not url[len(scheme) :].startswith("://"):
        raise UrlRefused(f"URL {redact_url(url)!r} must look like {scheme}://host/path; refused")
    netloc = parts.netloc.rpartition("@")[2]
    if parts.netloc.count("@") > 1:
        raise UrlRefused(f"URL {redact_url(url)!r} has more than one '@' in its authority; refused")
    raw_host = parts.hostname
    if not raw_host:
        raise UrlRefused(f"URL {redact_url(url)!r} names no host; refused")
    if "%" in raw_host:
        raise UrlRefused(f"URL host in {redact_url(url)!r} carries a zone id or escape; refused")
    port = explicit_port if explicit_port is not None else DEFAULT_PORTS[scheme]
    if port == 0:
        raise UrlRefused(f"URL {redact_url(url)!r} names port 0; refused")

    literal: IPAddress | None = None
    if netloc.startswith("["):
        try:
            literal = ipaddress.IPv6Address(raw_host)
        except ValueError:
            raise UrlRefused(f"URL {redact_url(url)!r} has a malformed IPv6 literal; refused") from None
        host = raw_host
    else:
        host = _ascii_host(raw_host, url)
        try:
            literal = ipaddress.IPv4Address(host)
        except ValueError:
            literal = None

    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        # Everything else, including the odd IPv4 spellings inet_aton accepts
        # (2130706433, 0x7f.1, 017700000001), goes through the resolver, and the
        # addresses it yields are what get checked and connected to.
        addresses = _resolve(host, port, resolve)

    for address in addresses:
        if policy.allow_private or _allowlisted(host, address, policy):
            continue
        problem = address_problem(address)
        if problem is not None:
            shown = f"[{host}]" if ":" in host else host
            if literal is not None:
                raise UrlRefused(f"URL host {shown!r} is {problem}; refused")
            raise UrlRefused(f"URL host {shown!r} resolves to {address}, {problem}; refused")
    return CheckedUrl(url=url, scheme=scheme, host=host, port=port, addresses=tuple(str(a) for a in addresses))


def _ascii_host(raw_host: str, url: str) -> str:
    # Keep a trailing dot if there is one: the host must read exactly as the HTTP
    # client will read it, since the fetcher only connects when the two agree.
    name, dot = (raw_host[:-1], ".") if raw_host.endswith(".") else (raw_host, "")
    if not name.isascii():
        try:
            import idna  # the IDNA 2008 codec httpx uses, so both sides agree on the name

            name = idna.encode(name, uts46=True).decode("ascii")
        except Exception:
            raise UrlRefused(f"URL {redact_url(url)!r} has a host that is not valid IDNA; refused") from None
    name = name.lower()
    if not _HOSTNAME_RE.match(name):
        raise UrlRefused(f"URL {redact_url(url)!r} has a malformed host name; refused")
    return name + dot


def _resolve(host: str, port: int, resolve: Resolver) -> list[IPAddress]:
    try:
        infos = resolve(host, port)
    except socket.gaierror as e:
        temporary = e.errno == socket.EAI_AGAIN
        raise DownloadError(f"URL host {host!r} did not resolve ({_first_line(e)})", retryable=temporary) from None
    except UnicodeError:
        raise UrlRefused(f"URL host {host!r} is not a valid host name; refused") from None
    seen: dict[str, IPAddress] = {}
    for info in infos:
        sockaddr = info[4]
        text = str(sockaddr[0]).split("%", 1)[0]  # drop an IPv6 scope id; the address decides
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise UrlRefused(f"URL host {host!r} resolved to something that is not an IP; refused") from None
        seen.setdefault(str(address), address)
    if not seen:
        raise DownloadError(f"URL host {host!r} resolved to no address", retryable=True)
    return list(seen.values())


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
