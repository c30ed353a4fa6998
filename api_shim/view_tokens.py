"""Signed, expiring links to a job's page: a person opens them without an API key.

A token is ``<expiry unix seconds>.<HMAC-SHA256(secret, "view:<job_id>:<expiry>") in base64url>``:
it names neither the key nor anything else, is good for one job only, and stops working at its
expiry (checked on every request the page makes, its event stream and downloads included).

The secret is ``ECG_VIEW_SECRET``; without it, one derived from the API keys (HMAC of the sorted
keys under a fixed label), so a shim with keys needs no other setting, and a token cannot be
made without knowing a key. No key and no secret: no links at all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from ecg_audio.settings import Settings

_LABEL = b"ecg-audio view_url v1"


def view_secret(settings: Settings) -> bytes | None:
    if settings.view_secret is not None and settings.view_secret.get_secret_value():
        return settings.view_secret.get_secret_value().encode()
    keys = sorted(k.get_secret_value() for k in settings.api_keys if k.get_secret_value())
    if not keys:
        return None
    return hmac.new(_LABEL, "\n".join(keys).encode("utf-8", "surrogatepass"), hashlib.sha256).digest()


def _mac(secret: bytes, job_id: str, expires: int, first_run: int) -> str:
    # a job re-created under the id of a purged one (first_run > 1) is another job: the links to the
    # earlier one must not open it
    name = job_id if first_run <= 1 else f"{job_id}#{first_run}"
    mac = hmac.new(secret, f"view:{name}:{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def make_token(secret: bytes, job_id: str, expires: int, *, first_run: int = 1) -> str:
    return f"{expires}.{_mac(secret, job_id, expires, first_run)}"


def check_token(secret: bytes | None, job_id: str, token: str, *, first_run: int = 1, now: float | None = None) -> bool:
    """True when ``token`` was made for ``job_id`` (the job whose record has ``first_run``) with
    ``secret`` and has not expired."""
    if secret is None:
        return False
    expires_s, _, mac = token.partition(".")
    if not expires_s.isdigit() or len(expires_s) > 12 or not mac:
        return False
    expires = int(expires_s)
    if expires < (time.time() if now is None else now):
        return False
    return hmac.compare_digest(_mac(secret, job_id, expires, first_run), mac)


def view_url(
    settings: Settings, job_id: str, base_url: str = "/", *, first_run: int = 1, now: float | None = None
) -> str | None:
    """``{base_url}jobs/{job_id}/view?token=...``, valid for ``ECG_VIEW_TTL_S``; None when no secret can be had."""
    secret = view_secret(settings)
    if secret is None:
        return None
    expires = int((time.time() if now is None else now) + settings.view_ttl_s)
    token = make_token(secret, job_id, expires, first_run=first_run)
    return f"{base_url.rstrip('/')}/jobs/{job_id}/view?token={token}"


# --- live stream tokens (POST /v1/stream/token) ----------------------------------------------
# A browser cannot set a header on a WebSocket, so it opens WS /v1/stream with ``?token=``: the same
# signature as a page link, over ``stream:<key fingerprint>`` (never a job id: those hold no ':'),
# so a token opens streams owned by the key that asked for it, until it expires.


def make_stream_token(secret: bytes, fingerprint: str, expires: int) -> str:
    return f"{fingerprint}.{make_token(secret, 'stream:' + fingerprint, expires)}"


def stream_token_owner(secret: bytes | None, token: str, *, now: float | None = None) -> str | None:
    """The key fingerprint a valid, unexpired stream token was made for; None otherwise."""
    fingerprint, _, rest = token.partition(".")
    if not fingerprint or len(fingerprint) > 64 or not fingerprint.isalnum():
        return None
    return fingerprint if check_token(secret, "stream:" + fingerprint, rest, now=now) else None
