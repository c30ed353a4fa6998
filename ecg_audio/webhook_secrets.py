"""Standard Webhooks signing (standardwebhooks.com) with one ``whsec_`` secret per API key.

Every callback carries ``webhook-id`` (the event id), ``webhook-timestamp`` (unix seconds) and
``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, one such entry per
secret that signs now, separated by spaces (the spec's way to rotate without a gap).

Secrets are never stored. A key's secret is derived from the fleet's root key
(``ECG_CALLBACK_SIGNING_KEY``, kept where the API keys are: environment or Secrets Manager) and
the key's fingerprint and *generation*: ``HMAC-SHA256(root, "whsec:v1:{fingerprint}:{generation}")``.
Redis holds only the generations (``ecg:whsec:{fingerprint}``: ``gen``, ``prev_gen``,
``prev_until``), so a copy of Redis (a backup, a dump) reveals no secret, and every shim and
dispatcher derives the same secret without sharing one. Rotating bumps the generation; the old
one keeps signing until ``prev_until`` (the overlap, ``ECG_WEBHOOK_ROTATION_OVERLAP_S``).
Rotating the root key re-keys every tenant at once (tell them first).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Any

import redis

from ecg_audio import keys

SECRET_PREFIX = keys.WEBHOOK_SECRET_GENERATIONS
NO_OWNER = "-"  # jobs made by operator commands (no API key) are signed as this owner
WHSEC = "whsec_"

# KEYS: the owner's generations hash. ARGV: now, overlap seconds. Returns the new generation.
_ROTATE_LUA = """
local gen = tonumber(redis.call('HGET', KEYS[1], 'gen') or '1')
redis.call('HSET', KEYS[1], 'gen', gen + 1, 'prev_gen', gen,
           'prev_until', tonumber(ARGV[1]) + tonumber(ARGV[2]))
return gen + 1
"""


def derive(root: bytes, owner: str, generation: int) -> str:
    """The ``whsec_`` secret of one key (``owner``: its fingerprint) at one generation."""
    mac = hmac.new(root, f"whsec:v1:{owner or NO_OWNER}:{generation}".encode(), hashlib.sha256).digest()
    return WHSEC + base64.b64encode(mac).decode()


def secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(WHSEC))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature entry, as the spec defines it."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()).decode()


def webhook_headers(secrets: list[str], msg_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers (no ``webhook-signature`` without a secret)."""
    ts = int(time.time() if now is None else now)
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(ts)}
    if secrets:
        headers["webhook-signature"] = " ".join(sign(s, msg_id, ts, body) for s in secrets)
    return headers


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def generations(fields: Mapping[Any, Any], now: float) -> list[int]:
    """The generations that sign now, current first, from the owner's hash (empty: generation 1)."""
    h = {_text(k): _text(v) for k, v in fields.items()}
    gens = [int(h.get("gen", "1"))]
    if "prev_gen" in h and float(h.get("prev_until", "0")) > now:
        gens.append(int(h["prev_gen"]))
    return gens


class WebhookSecrets:
    """Per-key secrets: read, rotate, and the list that signs a callback now."""

    def __init__(self, client: redis.Redis, root: str | None, overlap_s: float) -> None:
        self.r = client
        self.root = root.encode() if root else None
        self.overlap_s = overlap_s
        self._rotate = client.register_script(_ROTATE_LUA)

    @property
    def configured(self) -> bool:
        return self.root is not None

    def _need_root(self) -> bytes:
        if self.root is None:
            raise RuntimeError("webhook secrets need ECG_CALLBACK_SIGNING_KEY (the root key); none is set")
        return self.root

    def current(self, owner: str) -> str:
        root = self._need_root()
        return derive(root, owner, generations(self.r.hgetall(SECRET_PREFIX + owner), time.time())[0])  # type: ignore[arg-type]

    def signing(self, owner: str) -> list[str]:
        if self.root is None:
            return []
        fields = self.r.hgetall(SECRET_PREFIX + owner)
        return [derive(self.root, owner, g) for g in generations(fields, time.time())]  # type: ignore[arg-type]

    def rotate(self, owner: str, overlap_s: float | None = None) -> tuple[str, float]:
        """A new secret for ``owner``; the previous one keeps signing for the overlap. Returns the new
        secret and until when (unix time) the previous one signs too."""
        root = self._need_root()
        overlap = self.overlap_s if overlap_s is None else overlap_s
        now = time.time()
        gen = int(self._rotate(keys=[SECRET_PREFIX + owner], args=[repr(now), repr(float(overlap))]))  # type: ignore[arg-type]
        return derive(root, owner, gen), now + overlap


async def signing_async(client: Any, root: bytes | None, owner: str) -> list[str]:
    """``WebhookSecrets.signing`` over an asyncio Redis client (the dispatchers')."""
    if root is None:
        return []
    fields = await client.hgetall(SECRET_PREFIX + owner)
    return [derive(root, owner, g) for g in generations(fields, time.time())]
