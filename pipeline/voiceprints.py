"""Speakers by name: voiceprints from the diarization's own CAM++ model, matched over a recording.

A voiceprint is a unit-length 192-d vector: the mean direction of the CAM++ embeddings that
the diarization's clustering computed for one voice (``DiarizationResult.voiceprints``). A
recording's speakers and an enrolled sample are embedded the same way (the sample goes
through the same diarization), so their cosine similarity compares like with like.

Matching is an assignment over the whole recording, not nearest per segment: each label gets
at most one name, each name at most one label (Hungarian algorithm on the similarities), and
a pair below the threshold stays unnamed.

Plain numpy and scipy; :func:`voice_of_sample` imports the diarization (torch) when called.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline.errors import InvalidMediaError

MATCH_THRESHOLD = 0.833
"""Cosine similarity from which a recording's speaker takes an enrolled name: the middle of the
gap between the highest impostor and the lowest genuine pair of ``bench/speaker_id.py``'s tuning
voices, checked on voices not used for tuning (figures in bench/README.md). Unnamed is the safe
failure: a wrong name is worse than a label."""
MIN_SAMPLE_S = 5.0
MAX_SAMPLE_S = 60.0
MIN_SAMPLE_SPEECH_S = 3.0
OTHER_VOICE_SHARE = 0.25
OTHER_VOICE_SIMILARITY = 0.5
"""A sample is refused as two voices when its diarization finds a second voice that holds at least
``OTHER_VOICE_SHARE`` of the speech and sounds clearly unlike the first (cosine similarity under
``OTHER_VOICE_SIMILARITY``). Coarse on purpose: on clips of a few seconds the diarization both
splits one voice in two (pyannote's sample, 6.6 s of one voice: two labels at 0.64) and merges
two (two espeak voices, 8 s each: one label), so a stricter rule refuses good samples."""


@dataclass(frozen=True)
class Voiceprint:
    """An enrolled voice: its id in the library, a display name, the unit vector."""

    id: str
    name: str
    vector: Sequence[float]


@dataclass(frozen=True)
class SpeakerMatch:
    label: str
    id: str
    name: str
    similarity: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "similarity": self.similarity}


class SpeakerAccess(Protocol):
    """The enrolled voices a job may be matched with: its API key's library
    (``ecg_audio.speakers.JobSpeakers``), or a folder of samples (:class:`FixedSpeakers`)."""

    threshold: float

    def candidates(self, job_id: str, ids: list[str] | None) -> list[Voiceprint]: ...

    def keep_job_voices(self, job_id: str, voices: dict[str, list[float]]) -> None: ...


@dataclass
class FixedSpeakers:
    """Candidates known up front (``ecg-audio analyze --speakers DIR``); a job's voices are not kept."""

    voiceprints: list[Voiceprint]
    threshold: float = MATCH_THRESHOLD

    def candidates(self, job_id: str, ids: list[str] | None) -> list[Voiceprint]:
        return [v for v in self.voiceprints if ids is None or v.id in ids]

    def keep_job_voices(self, job_id: str, voices: dict[str, list[float]]) -> None:
        return None


def unit(vector: Sequence[float] | np.ndarray) -> np.ndarray | None:
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(v)) if v.size else 0.0
    if not np.isfinite(norm) or norm == 0.0:
        return None
    return v / norm


def mean_voiceprint(vectors: Sequence[Sequence[float]]) -> list[float]:
    """Several samples' voiceprints as one (the unit mean; empty when none is usable)."""
    units = [u for u in (unit(v) for v in vectors) if u is not None]
    if not units:
        return []
    total = unit(np.sum(units, axis=0))
    return [] if total is None else [round(float(x), 5) for x in total]


def match_speakers(
    labels: Mapping[str, Sequence[float]],
    candidates: Sequence[Voiceprint],
    threshold: float = MATCH_THRESHOLD,
) -> dict[str, SpeakerMatch]:
    """Names for a recording's speaker labels: the assignment of candidates to labels that
    maximises the total cosine similarity, keeping only pairs at or above ``threshold``.

    Args:
        labels: each diarized speaker's voiceprint (``DiarizationResult.voiceprints``).
        candidates: enrolled voices; two with one name count as one name (their better pair wins).
    """
    from scipy.optimize import linear_sum_assignment

    label_ids = [k for k, v in labels.items() if unit(v) is not None]
    if not label_ids:
        return {}
    dimension = len(labels[label_ids[0]])
    usable = [c for c in candidates if unit(c.vector) is not None and len(c.vector) == dimension]
    if not usable:
        return {}
    a = np.stack([unit(labels[k]) for k in label_ids])  # type: ignore[misc]
    b = np.stack([unit(c.vector) for c in usable])  # type: ignore[misc]
    similarity = a @ b.T
    # shape: (num_labels, num_candidates)
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    matches: dict[str, SpeakerMatch] = {}
    taken: dict[str, str] = {}
    for r, c in sorted(zip(rows, cols, strict=True), key=lambda rc: -similarity[rc[0], rc[1]]):
        score = float(similarity[r, c])
        candidate = usable[c]
        if score < threshold or candidate.name in taken:
            continue
        taken[candidate.name] = label_ids[r]
        matches[label_ids[r]] = SpeakerMatch(label_ids[r], candidate.id, candidate.name, round(score, 4))
    return matches


def identify_speakers(
    result: dict[str, Any], diarization: Any, access: SpeakerAccess, job_id: str, options: Mapping[str, Any]
) -> None:
    """Speakers by name in a job's result document (in place): its diarized speakers matched with
    the enrolled voices of ``access`` (``options.identify_speakers``, default on;
    ``options.speakers`` limits the candidates). The job's own voices are kept first, for
    enrolling from it (``POST /speakers`` with ``from_job``)."""
    import time

    from pipeline.merge import relabel_speakers

    names = relabel_speakers(diarization.turns)
    voices = {names.get(k, k): list(v) for k, v in diarization.voiceprints.items()}
    access.keep_job_voices(job_id, voices)
    if options.get("identify_speakers") is False:
        return
    t0 = time.perf_counter()
    ids = options.get("speakers")
    candidates = access.candidates(job_id, list(ids) if ids is not None else None)
    if not candidates:
        return
    name_speakers(result, match_speakers(voices, candidates, access.threshold))
    result.setdefault("metadata", {})["speaker_identification"] = {
        "candidates": len(candidates),
        "threshold": access.threshold,
        "seconds": round(time.perf_counter() - t0, 4),
    }


def name_speakers(result: dict[str, Any], matches: Mapping[str, SpeakerMatch]) -> None:
    """Give a result document's segments, words and diarization turns ``speaker_name`` and
    ``speaker_similarity`` where their ``speaker`` was matched (in place), each matched entry
    of its speaker summary a ``name``, and ``metadata.speakers`` (label -> name)."""
    for segment in result.get("segments", []):
        _name(segment, matches)
        for word in segment.get("words") or []:
            _name(word, matches)
    for turn in result.get("diarization", []):
        _name(turn, matches)
    for label, summary in (result.get("speakers") or {}).items():
        if label in matches:
            summary["name"] = matches[label].name
    metadata = result.setdefault("metadata", {})
    metadata["speakers"] = {label: m.name for label, m in sorted(matches.items())}
    metadata["speaker_matches"] = {label: m.to_dict() for label, m in sorted(matches.items())}


def _name(item: dict[str, Any], matches: Mapping[str, SpeakerMatch]) -> None:
    match = matches.get(str(item.get("speaker")))
    if match is not None:
        item["speaker_name"] = match.name
        item["speaker_similarity"] = match.similarity


@dataclass(frozen=True)
class SampleVoice:
    vector: list[float]
    duration: float
    speech: float


def voice_of_sample(pipeline: Any, audio: np.ndarray, sample_rate: int = 16000) -> SampleVoice:
    """The voiceprint of an enrollment sample: 5-60 s of one voice (float32 mono, shape (n,)).

    The sample goes through the same diarization as a job, so that its voiceprint is made as a
    recording's speakers' are. Refused (``InvalidMediaError`` with a code the API reports): too
    short or long (``SAMPLE_DURATION``), too little speech (``SAMPLE_NO_SPEECH``), more than
    one voice (``SAMPLE_MULTIPLE_VOICES``).
    """
    from pipeline.diarize import diarize

    duration = len(audio) / sample_rate
    if not MIN_SAMPLE_S <= duration <= MAX_SAMPLE_S:
        raise InvalidMediaError(
            f"a voice sample must last {MIN_SAMPLE_S:.0f}-{MAX_SAMPLE_S:.0f} s; this one lasts {duration:.1f} s",
            code="SAMPLE_DURATION",
        )
    check_one_voice(diarize(pipeline, audio))
    # the sample is one voice: embedded as one speaker, all of its speech
    whole = diarize(pipeline, audio, num_speakers=1)
    speech = sum(t.end - t.start for t in whole.exclusive_turns)
    if not whole.voiceprints:
        raise InvalidMediaError(
            f"the sample holds {speech:.1f} s of speech; a voice sample needs at least {MIN_SAMPLE_SPEECH_S:.0f} s",
            code="SAMPLE_NO_SPEECH",
        )
    vector = next(iter(whole.voiceprints.values()))
    return SampleVoice(vector=list(vector), duration=round(duration, 3), speech=round(speech, 3))


def check_one_voice(result: Any) -> None:
    """Refuse a sample with too little speech (``SAMPLE_NO_SPEECH``) or two clearly different
    voices (``SAMPLE_MULTIPLE_VOICES``, see ``OTHER_VOICE_SHARE``), from its diarization."""
    speech: dict[str, float] = {}
    for turn in result.exclusive_turns:
        speech[turn.speaker] = speech.get(turn.speaker, 0.0) + turn.end - turn.start
    total = sum(speech.values())
    if total < MIN_SAMPLE_SPEECH_S:
        raise InvalidMediaError(
            f"the sample holds {total:.1f} s of speech; a voice sample needs at least {MIN_SAMPLE_SPEECH_S:.0f} s",
            code="SAMPLE_NO_SPEECH",
        )
    ranked = sorted((k for k in speech if k in result.voiceprints), key=lambda k: -speech[k])
    for other in ranked[1:]:
        similarity = float(unit(result.voiceprints[ranked[0]]) @ unit(result.voiceprints[other]))  # type: ignore[operator]
        if speech[other] >= OTHER_VOICE_SHARE * total and similarity < OTHER_VOICE_SIMILARITY:
            raise InvalidMediaError(
                f"the sample holds more than one voice ({speech[other]:.1f} of {total:.1f} s sound like another "
                "person); send a sample of one voice only",
                code="SAMPLE_MULTIPLE_VOICES",
            )
