"""The speaker library: voiceprints per API key, in Redis.

A voiceprint is biometric data, so the library keeps as little as it can, in one place:

* ``ecg:speaker:{id}`` (hash): owner (the API key's fingerprint), name, the voiceprint (192
  numbers), each sample's own voiceprint and where it came from (seconds, ``upload`` or
  ``job:<id>:<label>``), times. No audio: an uploaded sample is deleted once embedded.
* ``ecg:speakers:{owner}`` (set): the key's speaker ids.
* ``ecg:job-voices:{job_id}`` (hash): the voiceprint of each speaker label of a finished job,
  kept as long as the job's record (``ECG_JOB_TTL_S``) so that ``POST /speakers`` can enroll
  ``{"from_job", "speaker"}``; removed with the job.

``delete`` removes the speaker's hash and its id from the index in one transaction: nothing of
it is left in Redis. Ids are random (128 bits); every read checks the owner, so another key
sees nothing (404), as for jobs.

Torch-free: the shim and the workers import it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from ecg_audio import keys
from pipeline.voiceprints import MATCH_THRESHOLD, Voiceprint, mean_voiceprint

SPEAKER_KEY = keys.SPEAKER
OWNER_INDEX_KEY = keys.SPEAKERS_OWNER
JOB_VOICES_KEY = keys.JOB_VOICES
PENDING_KEY = keys.SPEAKER_PENDING
ENROLL_TASK = "ecg.speakers.enroll"
"""The worker task that embeds an uploaded voice sample (the shim sends it by name)."""
SPEAKER_ID_PATTERN = r"^[a-f0-9]{32}$"
ENROLL_EXPIRES_S = 3600
"""A sample no worker took within this long is not embedded (the task expires; the uploads
sweep deletes the file, ``ECG_UPLOAD_TTL_S``)."""
MAX_SAMPLES = 20
"""Samples kept per speaker (their voiceprints: the mean is over them); the oldest go first."""


@dataclass
class SpeakerRecord:
    id: str
    owner: str
    name: str
    vector: list[float]
    samples: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = 0.0
    updated_at: float = 0.0

    def public(self) -> dict[str, Any]:
        """What the API shows: never the voiceprint itself."""
        return {
            "id": self.id,
            "name": self.name,
            "samples": [{k: v for k, v in s.items() if k != "vector"} for s in self.samples],
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    def voiceprint(self) -> Voiceprint:
        return Voiceprint(self.id, self.name, self.vector)


class SpeakerLibrary:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    # --- speakers -----------------------------------------------------------------------
    def create(
        self, owner: str, name: str, vector: Sequence[float], sample: dict[str, Any], *, speaker_id: str | None = None
    ) -> SpeakerRecord:
        now = time.time()
        rec = SpeakerRecord(
            id=speaker_id or uuid.uuid4().hex,
            owner=owner,
            name=name,
            vector=mean_voiceprint([vector]),
            samples=[{**sample, "vector": list(vector), "added_at": now}],
            created_at=now,
            updated_at=now,
        )
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(SPEAKER_KEY + rec.id, mapping=_to_hash(rec))
        pipe.sadd(OWNER_INDEX_KEY + owner, rec.id)
        pipe.execute()
        return rec

    def get(self, owner: str, speaker_id: str) -> SpeakerRecord | None:
        """The speaker, or None when there is none or it belongs to another key."""
        h = self.r.hgetall(SPEAKER_KEY + speaker_id)
        if not h:
            return None
        rec = _from_hash(h)  # type: ignore[arg-type]
        return rec if rec.owner == owner else None

    def owned(self, owner: str) -> list[SpeakerRecord]:
        ids = sorted(str(i) for i in self.r.smembers(OWNER_INDEX_KEY + owner))  # type: ignore[union-attr]
        records = [self.get(owner, i) for i in ids]
        return sorted((r for r in records if r is not None), key=lambda r: (r.name, r.created_at))

    def count(self, owner: str) -> int:
        return int(self.r.scard(OWNER_INDEX_KEY + owner))  # type: ignore[arg-type]

    def update(
        self,
        owner: str,
        speaker_id: str,
        *,
        name: str | None = None,
        add: tuple[Sequence[float], dict[str, Any]] | None = None,
    ) -> SpeakerRecord | None:
        """Rename and/or add a sample (its voiceprint joins the mean); None when not the owner's."""
        rec = self.get(owner, speaker_id)
        if rec is None:
            return None
        if name is not None:
            rec.name = name
        if add is not None:
            vector, sample = add
            rec.samples = [*rec.samples, {**sample, "vector": list(vector), "added_at": time.time()}][-MAX_SAMPLES:]
            rec.vector = mean_voiceprint([s["vector"] for s in rec.samples])
        rec.updated_at = time.time()
        self.r.hset(SPEAKER_KEY + rec.id, mapping=_to_hash(rec))
        return rec

    def delete(self, owner: str, speaker_id: str) -> bool:
        """Erase the speaker for good: its hash (voiceprint, samples' voiceprints) and index entry."""
        if self.get(owner, speaker_id) is None:
            return False
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(SPEAKER_KEY + speaker_id)
        pipe.srem(OWNER_INDEX_KEY + owner, speaker_id)
        pipe.execute()
        return True

    def voiceprints(self, owner: str, ids: Sequence[str] | None = None) -> list[Voiceprint]:
        """The key's voiceprints (only those of ``ids`` when given; unknown or foreign ids are skipped)."""
        wanted = list(ids) if ids is not None else sorted(str(i) for i in self.r.smembers(OWNER_INDEX_KEY + owner))  # type: ignore[union-attr]
        records = [self.get(owner, i) for i in wanted]
        return [r.voiceprint() for r in records if r is not None and r.vector]

    # --- samples sent to a worker and not embedded yet -----------------------------------
    def mark_pending(self, owner: str, speaker_id: str, upload: str, ttl_s: int) -> None:
        self.r.hset(PENDING_KEY + speaker_id, mapping={"owner": owner, "upload": upload})
        self.r.expire(PENDING_KEY + speaker_id, ttl_s)

    def take_pending(self, speaker_id: str) -> bool:
        """The worker's claim on a pending sample: False when it was cancelled (or expired)."""
        return bool(self.r.delete(PENDING_KEY + speaker_id))

    def cancel_pending(self, owner: str, speaker_id: str) -> str | None:
        """Cancel the owner's pending sample; its upload URL (to delete), or None when none is pending."""
        h: dict[str, str] = self.r.hgetall(PENDING_KEY + speaker_id)  # type: ignore[assignment]
        if not h or h.get("owner") != owner or not self.r.delete(PENDING_KEY + speaker_id):
            return None
        return h.get("upload")

    def is_pending(self, owner: str, speaker_id: str) -> bool:
        return self.r.hget(PENDING_KEY + speaker_id, "owner") == owner

    # --- the voices of finished jobs ----------------------------------------------------
    def keep_job_voices(self, job_id: str, owner: str | None, voices: dict[str, list[float]], ttl_s: int) -> None:
        key = JOB_VOICES_KEY + job_id
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(key)
        if voices:
            pipe.hset(key, mapping={"owner": owner or "", **{k: json.dumps(v) for k, v in voices.items()}})
            pipe.expire(key, ttl_s)
        pipe.execute()

    def job_voice(self, job_id: str, owner: str, label: str) -> list[float] | None:
        h: dict[str, str] = self.r.hgetall(JOB_VOICES_KEY + job_id)  # type: ignore[assignment]
        if not h or (h.get("owner") or "") not in ("", owner) or label == "owner" or label not in h:
            return None
        return [float(x) for x in json.loads(h[label])]


def unknown_speakers(library: SpeakerLibrary, owner: str, ids: Sequence[str]) -> list[str]:
    """Those of ``ids`` that are not speakers of ``owner`` (a job's ``options.speakers``)."""
    return [i for i in ids if library.get(owner, i) is None]


class JobSpeakers:
    """What a job's merge stage needs of the library (``tasks.stages.SpeakerAccess``): the
    candidates of the job's key, and a place for the job's own voices."""

    def __init__(
        self,
        library: SpeakerLibrary,
        owner_of: Callable[[str], str | None],
        ttl_s: int,
        threshold: float = MATCH_THRESHOLD,
    ) -> None:
        self.library = library
        self.owner_of = owner_of
        self.ttl_s = ttl_s
        self.threshold = threshold

    def candidates(self, job_id: str, ids: Sequence[str] | None) -> list[Voiceprint]:
        owner = self.owner_of(job_id)
        if owner is None:
            return []
        return self.library.voiceprints(owner, ids)

    def keep_job_voices(self, job_id: str, voices: dict[str, list[float]]) -> None:
        self.library.keep_job_voices(job_id, self.owner_of(job_id), voices, self.ttl_s)


def _to_hash(rec: SpeakerRecord) -> dict[Any, Any]:
    return {
        "id": rec.id,
        "owner": rec.owner,
        "name": rec.name,
        "vector": json.dumps(rec.vector),
        "samples": json.dumps(rec.samples),
        "created_at": repr(rec.created_at),
        "updated_at": repr(rec.updated_at),
    }


def _from_hash(h: dict[str, str]) -> SpeakerRecord:
    return SpeakerRecord(
        id=h["id"],
        owner=h["owner"],
        name=h["name"],
        vector=[float(x) for x in json.loads(h.get("vector") or "[]")],
        samples=list(json.loads(h.get("samples") or "[]")),
        created_at=float(h.get("created_at") or 0),
        updated_at=float(h.get("updated_at") or 0),
    )
