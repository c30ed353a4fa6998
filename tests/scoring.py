"""Scores a result against a reference without ``../shared``: the definitions of the shared
scorer (``../shared/tools/score.py``), which the tests use instead whenever it is there.

* ``wer``: word error rate over the whole call (lower-cased, punctuation dropped, hyphens split);
* ``cpwer``: the same with words grouped per speaker, hypothesis speakers mapped one-to-one
  to reference speakers in the way that gives the fewest errors (unmapped ones: insertions);
* ``der``: pyannote.metrics' diarization error rate, no collar, overlap scored, over the file;
* ``speakers_ref`` / ``speakers_hyp``: speakers in the reference turns and in the result.

References are pyannote's ``.stm`` (speaker, start, end, text per line) or the shared
recordings' ``.json``; speaker turns from an ``.rttm`` when one is given.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

Turn = tuple[str, float, float, str]


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split()


def edits(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance between two word lists."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def load_reference(path: Path) -> list[Turn]:
    if path.suffix == ".json":
        return [(t["speaker"], t["start"], t["end"], t["text"]) for t in json.loads(path.read_text())["turns"]]
    turns = []
    for line in path.read_text().splitlines():
        p = line.split()
        if len(p) >= 6:
            turns.append((p[2], float(p[3]), float(p[4]), " ".join(p[5:])))
    return turns


def load_rttm(path: Path) -> list[tuple[str, float, float]]:
    out = []
    for line in path.read_text().splitlines():
        p = line.split()
        if p and p[0] == "SPEAKER":
            out.append((p[7], float(p[3]), float(p[3]) + float(p[4])))
    return out


def _cpwer(ref: list[Turn], segments: list[dict[str, Any]], num_ref_words: int) -> float:
    rs = sorted({t[0] for t in ref})
    hs = sorted({s.get("speaker") or "?" for s in segments})
    rw = {r: [w for t in sorted(ref, key=lambda t: t[1]) if t[0] == r for w in words(t[3])] for r in rs}
    in_order = sorted(segments, key=lambda s: s["start"])
    hw = {h: [w for s in in_order if (s.get("speaker") or "?") == h for w in words(s["text"])] for h in hs}
    pad: list[str | None] = [*hs, *([None] * max(0, len(rs) - len(hs)))]
    best: int | None = None
    for perm in itertools.permutations(pad, len(rs)):
        e = sum(edits(rw[r], hw[h] if h else []) for r, h in zip(rs, perm, strict=True))
        e += sum(len(hw[h]) for h in hs if h not in perm)
        best = e if best is None else min(best, e)
    return round((best or 0) / max(1, num_ref_words), 4)


def score_result(result_json: Path, reference: Path, rttm: Path | None = None) -> dict[str, Any]:
    from pyannote.core import Annotation, Segment
    from pyannote.metrics.diarization import DiarizationErrorRate

    doc = json.loads(result_json.read_text())
    res = doc.get("result", doc)
    segments = res["segments"]
    ref = load_reference(reference)
    ref_words = [w for t in sorted(ref, key=lambda t: t[1]) for w in words(t[3])]
    hyp_words = [w for s in sorted(segments, key=lambda s: s["start"]) for w in words(s["text"])]
    ref_turns = load_rttm(rttm) if rttm else [(t[0], t[1], t[2]) for t in ref]
    reference_ann, hypothesis = Annotation(), Annotation()
    for speaker, start, end in ref_turns:
        reference_ann[Segment(start, end)] = speaker
    for t in res.get("diarization", []):
        hypothesis[Segment(t["start"], t["end"])] = t["speaker"]
    duration = res.get("metadata", {}).get("duration") or max(e for _, _, e in ref_turns)
    der = DiarizationErrorRate(collar=0.0, skip_overlap=False)(reference_ann, hypothesis, uem=Segment(0, duration))
    return {
        "wer": round(edits(ref_words, hyp_words) / max(1, len(ref_words)), 4),
        "cpwer": _cpwer(ref, segments, len(ref_words)),
        "der": round(float(der), 4),
        "speakers_ref": len({t[0] for t in ref_turns}),
        "speakers_hyp": len({t["speaker"] for t in res.get("diarization", [])}),
    }
