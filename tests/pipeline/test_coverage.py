"""Speech coverage and the stretches of speech without words."""

from __future__ import annotations

import pytest

from pipeline.coverage import Gap, coverage_metadata, explain, speech_coverage, subtract, uncovered, union


def test_interval_arithmetic() -> None:
    assert union([(3, 4), (0, 1), (0.5, 2)]) == [(0, 2), (3, 4)]
    assert subtract([(0, 10)], [(1, 2), (5, 6)]) == [(0, 1), (2, 5), (6, 10)]
    assert subtract([(0, 2), (3, 4)], [(1, 3.5)]) == [(0, 1), (3.5, 4)]


def test_words_cover_their_turn_and_a_silent_stretch_is_a_gap() -> None:
    speech = [(0.0, 10.0), (12.0, 20.0)]
    words = [[(0.2, 0.6), (0.9, 1.5), (2.0, 9.6)], [(12.3, 13.0)]]  # nothing after 13.5 s
    assert uncovered(speech, words) == [(13.5, 20.0)]
    assert speech_coverage(speech, words) == pytest.approx(1 - 6.5 / 18, abs=1e-3)
    assert speech_coverage([], words) is None


def test_a_gap_takes_the_reason_that_overlaps_it_most() -> None:
    reasons = [Gap(0, 5, "loop dropped"), Gap(13, 21, "no words: decoded twice")]
    assert [g.why for g in explain([(13.5, 20.0), (30, 31)], reasons, "none")] == ["no words: decoded twice", "none"]


def test_metadata_says_when_coverage_is_low() -> None:
    result = {
        "diarization": [{"start": 0.0, "end": 10.0, "speaker": "A"}, {"start": 10.0, "end": 30.0, "speaker": "B"}],
        "segments": [{"words": [{"start": 0.5, "end": 9.5}]}],
    }
    md = coverage_metadata(result, [{"start": 10.0, "end": 30.0, "why": "no words: decoded twice"}], {"stretches": 1})
    assert md["speech_coverage"] == pytest.approx(1 / 3, abs=0.01)
    assert md["gaps"] == [{"start": 10.0, "end": 30.0, "why": "no words: decoded twice"}]
    assert "low speech coverage: 33%" in md["coverage_note"]
    result["segments"].append({"words": [{"start": 10.2, "end": 29.9}]})
    assert "coverage_note" not in coverage_metadata(result, [], {})
