"""Name resolution for the submission-time SSRF check, with a deadline.

Submission resolves the media host. A name server that never answers would hold a request
thread for the resolver's own timeouts (tens of seconds); a small pool and a deadline cap that.
"""

from __future__ import annotations

import concurrent.futures
import socket
from typing import Any

DNS_DEADLINE_S = 3.0
_dns_pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="shim-dns")


class NeedsDns(Exception):
    """Raised by ``no_dns``: this URL's check must resolve a name (in a thread)."""


def no_dns(host: str, port: int) -> list[tuple[Any, ...]]:
    """A resolver for the event loop: it never resolves, it says a thread is needed."""
    raise NeedsDns(host)


def resolve_with_deadline(host: str, port: int) -> list[tuple[Any, ...]]:
    """``socket.getaddrinfo`` that gives up after DNS_DEADLINE_S (as a temporary DNS failure)."""
    deadline = DNS_DEADLINE_S  # read at call time, so a test can shorten it
    future = _dns_pool.submit(socket.getaddrinfo, host, port)
    try:
        return list(future.result(timeout=deadline))
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise socket.gaierror(socket.EAI_AGAIN, f"no DNS answer within {deadline:g} s") from None
