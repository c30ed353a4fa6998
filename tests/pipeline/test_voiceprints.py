"""Speakers by name: the assignment of enrolled voices to a recording's speakers, and names in
the result and its exports (numpy only; the CAM++ side is in tests/system/test_speakers.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.diarize.result import DiarizationResult, SpeakerTurn, result_from_raw
from pipeline.exports import exports
from pipeline.voiceprints import (
    FixedSpeakers,
    Voiceprint,
    identify_speakers,
    match_speakers,
    mean_voiceprint,
    name_speakers,
)


def _axis(i: int, dim: int = 8, tilt: float = 0.0, j: int | None = None) -> list[float]:
    v = np.zeros(dim)
    v[i] = 1.0
    if j is not None:
        v[j] = tilt
    return list(v / np.linalg.norm(v))


def test_each_name_goes_to_one_label_over_the_whole_recording() -> None:
    # both labels are nearest to Alice; per-label nearest would name both Alice. The assignment
    # gives Alice to the closer label and Bob to the other (above the threshold)
    labels = {"SPEAKER_00": _axis(0), "SPEAKER_01": _axis(0, tilt=0.8, j=1)}
    alice, bob = Voiceprint("a", "Alice", _axis(0)), Voiceprint("b", "Bob", _axis(1))
    sims = {k: (np.dot(v, alice.vector), np.dot(v, bob.vector)) for k, v in labels.items()}
    assert all(a > b for a, b in sims.values())  # each label alone is nearest to Alice
    matches = match_speakers(labels, [alice, bob], threshold=0.3)
    assert {k: m.name for k, m in matches.items()} == {"SPEAKER_00": "Alice", "SPEAKER_01": "Bob"}
    assert matches["SPEAKER_00"].similarity > matches["SPEAKER_01"].similarity


def test_a_voice_below_the_threshold_stays_unnamed() -> None:
    labels = {"SPEAKER_00": _axis(0), "SPEAKER_01": _axis(2)}
    matches = match_speakers(labels, [Voiceprint("a", "Alice", _axis(0)), Voiceprint("b", "Bob", _axis(1))], 0.5)
    assert list(matches) == ["SPEAKER_00"]
    assert match_speakers(labels, [], 0.5) == {}
    assert match_speakers({}, [Voiceprint("a", "Alice", _axis(0))], 0.5) == {}


def test_two_voiceprints_of_one_name_name_one_label() -> None:
    labels = {"SPEAKER_00": _axis(0), "SPEAKER_01": _axis(1)}
    twins = [Voiceprint("a1", "Alice", _axis(0)), Voiceprint("a2", "Alice", _axis(1))]
    assert len(match_speakers(labels, twins, 0.5)) == 1


def test_mean_voiceprint_is_unit_length_and_skips_unusable() -> None:
    v = mean_voiceprint([_axis(0), _axis(1), [0.0] * 8, [float("nan")] * 8])
    assert abs(np.linalg.norm(v) - 1.0) < 1e-4 and abs(v[0] - v[1]) < 1e-6
    assert mean_voiceprint([]) == []


def test_diarization_voiceprints_follow_the_renaming_and_survive_json() -> None:
    raw = [(5.0, 6.0, "B"), (0.0, 1.0, "A")]
    result = result_from_raw(raw, None, {"A": [2.0, 0.0], "B": [0.0, 3.0], "Z": [1.0, 1.0]})
    assert result.voiceprints == {"SPEAKER_00": [1.0, 0.0], "SPEAKER_01": [0.0, 1.0]}
    assert DiarizationResult.from_dict(result.to_dict()).voiceprints == result.voiceprints
    old = {"turns": [], "exclusive_turns": [], "num_speakers": 0}  # a diarization.json written before
    assert DiarizationResult.from_dict(old).voiceprints == {}


def _result() -> dict[str, Any]:
    words = [{"word": "hi", "start": 0.0, "end": 0.5, "speaker": "SPEAKER_00", "score": 1.0}]
    return {
        "segments": [
            {"id": 0, "start": 0.0, "end": 0.5, "speaker": "SPEAKER_00", "text": "hi", "words": words},
            {"id": 1, "start": 1.0, "end": 1.5, "speaker": "SPEAKER_01", "text": "yo", "words": []},
        ],
        "diarization": [
            {"start": 0.0, "end": 0.5, "speaker": "SPEAKER_00"},
            {"start": 1.0, "end": 1.5, "speaker": "SPEAKER_01"},
        ],
        "speakers": {"SPEAKER_00": {"total_duration": 0.5}, "SPEAKER_01": {"total_duration": 0.5}},
        "metadata": {},
    }


def test_names_in_the_result_and_every_export() -> None:
    result = _result()
    diar = DiarizationResult(
        turns=[SpeakerTurn(0.0, 0.5, "SPEAKER_00"), SpeakerTurn(1.0, 1.5, "SPEAKER_01")],
        exclusive_turns=[],
        num_speakers=2,
        voiceprints={"SPEAKER_00": _axis(0), "SPEAKER_01": _axis(3)},
    )
    kept: dict[str, Any] = {}

    class Access(FixedSpeakers):
        def keep_job_voices(self, job_id: str, voices: dict[str, list[float]]) -> None:
            kept[job_id] = voices

    access = Access([Voiceprint("k1", "Kim Min-ji", _axis(0)), Voiceprint("b", "Bob", _axis(1))], 0.5)
    identify_speakers(result, diar, access, "job-1", {})
    assert kept["job-1"]["SPEAKER_01"] == _axis(3)  # every label's voice is kept, named or not
    seg0, seg1 = result["segments"]
    assert seg0["speaker"] == "SPEAKER_00" and seg0["speaker_name"] == "Kim Min-ji"
    assert seg0["speaker_similarity"] == 1.0 and seg0["words"][0]["speaker_name"] == "Kim Min-ji"
    assert "speaker_name" not in seg1  # below the threshold: unnamed
    assert result["metadata"]["speakers"] == {"SPEAKER_00": "Kim Min-ji"}
    assert result["speakers"]["SPEAKER_00"]["name"] == "Kim Min-ji"
    assert result["metadata"]["speaker_identification"]["candidates"] == 2
    out = exports(result, "job-1")
    assert "[Kim Min-ji] hi" in out["srt"] and "[SPEAKER_01] yo" in out["srt"]
    assert "<v Kim Min-ji>hi" in out["vtt"]
    assert " Kim_Min-ji " in out["rttm"] and " SPEAKER_01 " in out["rttm"]


def test_options_turn_matching_off_or_limit_the_candidates() -> None:
    diar = DiarizationResult([SpeakerTurn(0.0, 0.5, "SPEAKER_00")], [], 1, {"SPEAKER_00": _axis(0)})
    access = FixedSpeakers([Voiceprint("a", "Alice", _axis(0)), Voiceprint("b", "Bob", _axis(0))], 0.5)
    off = _result()
    identify_speakers(off, diar, access, "j", {"identify_speakers": False})
    assert "speaker_name" not in off["segments"][0] and "speakers" not in off["metadata"]
    only_bob = _result()
    identify_speakers(only_bob, diar, access, "j", {"speakers": ["b"]})
    assert only_bob["segments"][0]["speaker_name"] == "Bob"


def test_name_speakers_without_matches_leaves_labels() -> None:
    result = _result()
    name_speakers(result, {})
    assert result["metadata"]["speakers"] == {}
    assert all("speaker_name" not in s for s in result["segments"])


def test_a_sample_with_two_clearly_different_voices_is_refused() -> None:
    import pytest

    from pipeline.errors import InvalidMediaError
    from pipeline.voiceprints import check_one_voice

    def diarized(seconds: dict[str, float], prints: dict[str, list[float]]) -> DiarizationResult:
        turns, t = [], 0.0
        for label, s in seconds.items():
            turns.append(SpeakerTurn(t, t + s, label))
            t += s
        return DiarizationResult(turns, turns, len(seconds), prints)

    check_one_voice(diarized({"A": 10.0}, {"A": _axis(0)}))
    # one voice split in two by the diarization (alike): accepted; a short aside: accepted
    check_one_voice(diarized({"A": 6.0, "B": 4.0}, {"A": _axis(0), "B": _axis(0, tilt=0.8, j=1)}))
    check_one_voice(diarized({"A": 9.0, "B": 1.0}, {"A": _axis(0), "B": _axis(1)}))
    with pytest.raises(InvalidMediaError) as two:
        check_one_voice(diarized({"A": 6.0, "B": 4.0}, {"A": _axis(0), "B": _axis(1)}))
    assert two.value.code == "SAMPLE_MULTIPLE_VOICES"
    with pytest.raises(InvalidMediaError) as silent:
        check_one_voice(diarized({"A": 2.0}, {"A": _axis(0)}))
    assert silent.value.code == "SAMPLE_NO_SPEECH"
