"""``GET /jobs``: a key's jobs, newest first, in pages that neither skip nor repeat.

Each owned job is in the owner's index (``ecg_audio.jobs.OWNER_PREFIX`` + fingerprint), scored
by its creation time. A cursor is the (score, job_id) of the last job a page looked at; the
next page starts strictly after it in (score desc, job_id desc) order, which is the order
``ZREVRANGEBYSCORE`` returns, so jobs created meanwhile (newer) never shift a page.
One request looks at ``MAX_SCAN`` index entries at most: with a status filter a page may hold
fewer jobs than asked for, and still carry a cursor to go on.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import cast

from api_shim.errors import ApiError
from ecg_audio.jobs import OWNER_PREFIX, PREFIX, JobRecord, JobStore

MAX_SCAN = 2000
BATCH = 200


@dataclass(frozen=True)
class Cursor:
    score: float
    job_id: str

    def encode(self) -> str:
        return base64.urlsafe_b64encode(f"{self.score!r}|{self.job_id}".encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
            score, _, job_id = raw.partition("|")
            return cls(float(score), job_id)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise ApiError(422, "INVALID_CURSOR", "cursor: not one this API returned") from None


def list_jobs(
    store: JobStore, owner: str, *, limit: int, status: str | None, cursor: Cursor | None
) -> tuple[list[JobRecord], Cursor | None]:
    index = OWNER_PREFIX + owner
    top = repr(cursor.score) if cursor else "+inf"
    found: list[JobRecord] = []
    last: Cursor | None = None
    offset = scanned = 0
    while len(found) < limit and scanned < MAX_SCAN:
        batch = cast(
            list[tuple[str, float]],
            store.r.zrevrangebyscore(index, top, "-inf", start=offset, num=BATCH, withscores=True),
        )
        if not batch:
            return found, None  # the end of the index
        offset += len(batch)
        fresh = [
            (str(m), float(s)) for m, s in batch if cursor is None or float(s) < cursor.score or str(m) < cursor.job_id
        ]
        pipe = store.r.pipeline()
        for job_id, _ in fresh:
            pipe.hgetall(PREFIX + job_id)
        for (job_id, score), h in zip(fresh, pipe.execute(), strict=True):
            scanned += 1
            last = Cursor(score, job_id)
            if not h:
                store.r.zrem(index, job_id)  # the record expired: so does its index entry
            else:
                rec = JobRecord.from_hash(h)
                if status is None or rec.status == status:
                    found.append(rec)
            if len(found) == limit or scanned >= MAX_SCAN:
                return found, last
    return found, last
