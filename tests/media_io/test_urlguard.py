"""URL policy: what a worker may fetch. No network: IP literals need no resolver, names use stubs."""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any

import pytest

from media_io.urlguard import (
    MAX_URL_LENGTH,
    UrlPolicy,
    UrlRefused,
    address_problem,
    check_url,
    redact_url,
    s3_bucket_and_key,
)
from pipeline.errors import DownloadError


def stub_resolver(table: dict[str, list[str]]) -> Any:
    """A getaddrinfo stand-in: names from ``table``, never from DNS; lookups recorded in ``.calls``."""
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[tuple[Any, ...]]:
        calls.append(host)
        if host not in table:
            # Numeric spellings (2130706433, 0x7f.1) the way the C library reads them; names fail.
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        out = []
        for text in table[host]:
            family = socket.AF_INET6 if ":" in text else socket.AF_INET
            sockaddr = (text, port, 0, 0) if family == socket.AF_INET6 else (text, port)
            out.append((family, socket.SOCK_STREAM, 6, "", sockaddr))
        return out

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


STUB = stub_resolver(
    {
        "evil.example": ["127.0.0.1"],
        "metadata.example": ["169.254.169.254"],
        "mixed.example": ["93.184.216.34", "10.1.2.3"],
        "v6loop.example": ["::1"],
        "media.example": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
        "minio.internal": ["10.0.0.7"],
    }
)

REFUSED = [
    ("http://127.0.0.1/", "loopback"),
    ("http://127.0.0.1:8080/clip.mp4", "loopback"),
    ("http://10.0.0.1/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://100.64.0.1/", "non-global"),
    ("http://224.0.0.1/", "multicast"),
    ("http://240.0.0.1/", "a reserved address|a private address"),  # which one varies by Python
    ("http://255.255.255.255/", "a reserved address|a private address"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://[::1]/", "loopback"),
    ("http://[::]/", "unspecified"),
    ("http://[::ffff:127.0.0.1]/", "IPv4-mapped form of 127.0.0.1"),
    ("http://[::ffff:a9fe:a9fe]/", "IPv4-mapped form of 169.254.169.254"),
    ("http://[2002:7f00:1::]/", "6to4 form of 127.0.0.1"),
    ("http://[2002:c0a8:101::1]/", "6to4 form of 192.168.1.1"),
    ("http://[64:ff9b::7f00:1]/", "NAT64 form of 127.0.0.1"),
    ("http://[64:ff9b:1::a00:1]/", "local-use NAT64"),
    ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "Teredo"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fc00::1]/", "private"),
    ("http://[fec0::1]/", "site-local"),
    ("http://[ff02::1]/", "multicast"),
    ("http://[::7f00:1]/", "reserved"),  # IPv4-compatible, deprecated
    # Odd IPv4 spellings: glibc's resolver turns them into 127.0.0.1 without DNS.
    ("http://2130706433/", "resolves to 127.0.0.1"),
    ("http://0x7f000001/", "resolves to 127.0.0.1"),
    ("http://0x7f.1/", "resolves to 127.0.0.1"),
    ("http://017700000001/", "resolves to 127.0.0.1"),
    ("http://127.1/", "resolves to 127.0.0.1"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED)
def test_non_public_addresses_are_refused(url: str, reason: str) -> None:
    with pytest.raises(UrlRefused, match="refused") as info:
        check_url(url, UrlPolicy())
    assert re.search(reason, info.value.message)
    assert info.value.retryable is False
    assert info.value.code == "DOWNLOAD_ERROR"
    assert isinstance(info.value, DownloadError)


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("evil.example", "resolves to 127.0.0.1, a loopback address"),
        ("metadata.example", "resolves to 169.254.169.254, a link-local address"),
        ("mixed.example", "resolves to 10.1.2.3, a private address"),  # one bad answer spoils the lot
        ("v6loop.example", "resolves to ::1, a loopback address"),
    ],
)
def test_names_resolving_to_non_public_addresses_are_refused(host: str, reason: str) -> None:
    with pytest.raises(UrlRefused) as info:
        check_url(f"https://{host}/clip.mp4", UrlPolicy(), resolve=STUB)
    assert info.value.message == f"URL host {host!r} {reason}; refused"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/clip.mp4",
        "file:///etc/passwd",
        "gopher://example.com/_x",
        "javascript:alert(1)",
        "data:text/plain,hello",
        "dict://example.com:11211/",
        "/etc/passwd",
        "clip.mp4",
        "//example.com/clip.mp4",
    ],
)
def test_schemes_and_local_paths_are_refused_by_default(url: str) -> None:
    with pytest.raises(UrlRefused, match="refused"):
        check_url(url, UrlPolicy(), resolve=STUB)


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/a\x00b.mp4",
        "http://example.com/a\r\nX-Injected: 1",
        "http://example.com/a b.mp4",
        "http://example.com/a\tb",
        "http://exa\u202emple.com/",  # bidi override
        "http://example.com/\u200b",  # zero-width space
        " http://example.com/",
        "http://evil.example\\@127.0.0.1/",
        "http://a@b@example.com/",
        "http://example.com:99999/",
        "http://example.com:port/",
        "http://[fe80::1%25eth0]/",
        "http://[::1/",
        "http:///nohost",
        "http://ex_ample..com/",
        "",
    ],
)
def test_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(UrlRefused):
        check_url(url, UrlPolicy(), resolve=STUB)


def test_over_long_url_is_refused_without_resolving() -> None:
    resolve = stub_resolver({"media.example": ["93.184.216.34"]})
    url = "https://media.example/" + "a" * MAX_URL_LENGTH
    with pytest.raises(UrlRefused, match=f"at most {MAX_URL_LENGTH}"):
        check_url(url, UrlPolicy(), resolve=resolve)
    assert resolve.calls == []


def test_http_refused_when_policy_allows_only_https() -> None:
    policy = UrlPolicy(allowed_schemes=frozenset({"https"}))
    with pytest.raises(UrlRefused, match="scheme 'http' is not accepted"):
        check_url("http://media.example/clip.mp4", policy, resolve=STUB)
    assert check_url("https://media.example/clip.mp4", policy, resolve=STUB).scheme == "https"


def test_public_host_is_resolved_once_and_its_addresses_returned() -> None:
    resolve = stub_resolver({"media.example": ["93.184.216.34", "93.184.216.34", "2606:2800:220:1::1"]})
    checked = check_url("https://Media.Example/v/clip.mp4?x=1", UrlPolicy(), resolve=resolve)
    assert resolve.calls == ["media.example"]
    assert checked.host == "media.example"
    assert checked.port == 443
    assert checked.addresses == ("93.184.216.34", "2606:2800:220:1::1")


def test_explicit_port_and_public_literal() -> None:
    checked = check_url("http://93.184.216.34:8080/a.wav", UrlPolicy())
    assert (checked.host, checked.port, checked.addresses) == ("93.184.216.34", 8080, ("93.184.216.34",))


@pytest.mark.parametrize(
    ("allowlist", "url"),
    [
        (("127.0.0.1",), "http://127.0.0.1:9000/clip.mp4"),
        (("127.0.0.0/8",), "http://127.0.0.1:9000/clip.mp4"),
        (("127.0.0.1",), "http://[::ffff:127.0.0.1]:9000/clip.mp4"),
        (("10.0.0.0/8",), "http://minio.internal:9000/clip.mp4"),
        (("minio.internal",), "http://minio.internal:9000/clip.mp4"),
        (("::1",), "http://[::1]:9000/clip.mp4"),
    ],
)
def test_allowlist_permits_private_addresses(allowlist: tuple[str, ...], url: str) -> None:
    checked = check_url(url, UrlPolicy(allowlist=allowlist), resolve=STUB)
    assert checked.port == 9000


def test_allowlist_is_narrow() -> None:
    policy = UrlPolicy(allowlist=("127.0.0.1", "minio.internal"))
    for url in ("http://127.0.0.2/", "http://10.0.0.1/", "http://metadata.example/", "http://[::1]/"):
        with pytest.raises(UrlRefused):
            check_url(url, policy, resolve=STUB)


def test_allow_private_permits_everything_network() -> None:
    checked = check_url("http://evil.example/", UrlPolicy(allow_private=True), resolve=STUB)
    assert checked.addresses == ("127.0.0.1",)


def test_malformed_allowlist_entry_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="allowlist entry"):
        UrlPolicy(allowlist=("not a host!",))
    with pytest.raises(ValueError, match="tuple"):
        UrlPolicy(allowlist="127.0.0.1")  # type: ignore[arg-type]


def test_dns_failure_is_a_download_error_retryable_only_when_temporary() -> None:
    with pytest.raises(DownloadError) as info:
        check_url("https://nowhere.example/", UrlPolicy(), resolve=STUB)
    assert not isinstance(info.value, UrlRefused) and info.value.retryable is False

    def flaky(host: str, port: int) -> list[tuple[Any, ...]]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    with pytest.raises(DownloadError) as info:
        check_url("https://media.example/", UrlPolicy(), resolve=flaky)
    assert info.value.retryable is True


def test_credentials_and_query_tokens_never_reach_messages() -> None:
    url = "http://alice:hunter2@evil.example/clip.mp4?token=SECRET123&X-Amz-Signature=SIG456"
    with pytest.raises(UrlRefused) as info:
        check_url(url + "\n", UrlPolicy(), resolve=STUB)
    for secret in ("alice", "hunter2", "SECRET123", "SIG456", "\n"):
        assert secret not in info.value.message
    # Userinfo is allowed in itself; only the address decides.
    assert check_url(url.replace("evil", "media"), UrlPolicy(), resolve=STUB).host == "media.example"


def test_redact_url() -> None:
    assert redact_url("https://u:p@h.example/a/b.mp4?sig=abc&x=1#frag") == "https://***@h.example/a/b.mp4?sig=***&x=***"
    assert "\n" not in redact_url("https://h.example/a\r\nb") and "\r" not in redact_url("x\ry")
    assert redact_url("x\ry\u202e") == "x%0Dy?"
    assert redact_url("http://[::1") == "<unparsable URL>"
    assert len(redact_url("https://h.example/" + "x" * 5000)) == 200


@pytest.mark.parametrize(
    ("url", "bucket", "key"),
    [
        ("s3://media-bucket/in/clip.mp4", "media-bucket", "in/clip.mp4"),
        ("s3://my.bucket.01/a?b#c.wav", "my.bucket.01", "a?b#c.wav"),  # keys are raw text
    ],
)
def test_s3_urls_are_checked_without_resolving(url: str, bucket: str, key: str) -> None:
    resolve = stub_resolver({})
    checked = check_url(url, UrlPolicy(), resolve=resolve)
    assert resolve.calls == []
    assert (checked.scheme, checked.addresses) == ("s3", ())
    assert s3_bucket_and_key(checked) == (bucket, key)


@pytest.mark.parametrize(
    "url",
    [
        "s3://bucket",
        "s3://bucket/",
        "s3://bucket/folder/",
        "s3://Bad_Bucket/key",
        "s3://ab/key",
        "s3://192.168.1.1/key",
        "s3://a..b/key",
        "s3://-bucket/key",
        "s3://bucket/" + "k" * 1025,
    ],
)
def test_bad_s3_urls_are_refused(url: str) -> None:
    with pytest.raises(UrlRefused):
        check_url(url, UrlPolicy())


def test_s3_refused_when_policy_excludes_it() -> None:
    with pytest.raises(UrlRefused, match="scheme 's3'"):
        check_url("s3://bucket/key.wav", UrlPolicy(allowed_schemes=frozenset({"https"})))


def test_local_files_only_when_policy_allows() -> None:
    policy = UrlPolicy(allow_local_files=True)
    assert check_url("/data/in/clip.wav", policy).scheme == "file"
    assert check_url("relative/clip.wav", policy).scheme == "file"
    assert check_url("file:///data/in/clip.wav", policy).scheme == "file"
    assert check_url("file://localhost/data/in/clip.wav", policy).scheme == "file"
    with pytest.raises(UrlRefused, match="names host"):
        check_url("file://fileserver/share/clip.wav", policy)


def test_address_problem_accepts_public_addresses() -> None:
    for text in ("93.184.216.34", "8.8.8.8", "2606:2800:220:1::1", "2a00:1450:4001:81c::200e"):
        assert address_problem(ipaddress.ip_address(text)) is None


def test_local_path_may_hold_spaces() -> None:
    assert check_url("/data/My Recording.m4a", UrlPolicy(allow_local_files=True)).url == "/data/My Recording.m4a"
    with pytest.raises(UrlRefused):
        check_url("/data/a\nb.wav", UrlPolicy(allow_local_files=True))
