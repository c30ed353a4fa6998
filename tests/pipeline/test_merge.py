"""Speaker attribution, segmentation and exports, on hand-made inputs."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.exports import to_rttm, to_srt, to_vtt
from pipeline.merge import assign_word_speakers, build_segments, relabel_speakers


@dataclass
class T:
    start: float
    end: float
    speaker: str


@dataclass
class W:
    word: str
    start: float
    end: float
    score: float | None = 0.9


def words_of(text: str, start: float, step: float = 0.3) -> list[W]:
    return [W(w, start + i * step, start + i * step + 0.25) for i, w in enumerate(text.split())]


def test_words_follow_the_turns() -> None:
    turns = [T(0, 3.0, "A"), T(3.2, 6.0, "B")]
    ws = words_of("one two three four five six seven eight nine.", 0.1) + words_of("yes I agree.", 3.4)
    out = assign_word_speakers(ws, turns, turns)
    assert [w.speaker for w in out[:9]] == ["A"] * 9
    assert [w.speaker for w in out[9:]] == ["B"] * 3


def test_jittered_last_word_stays_with_its_sentence() -> None:
    # the last word of A's sentence is timed 0.2 s into B's turn (Whisper's jitter)
    turns = [T(0, 2.0, "A"), T(2.0, 4.0, "B")]
    ws = [W("we", 0.2, 0.5), W("went", 0.6, 0.9), W("home", 1.0, 1.4), W("today.", 1.95, 2.3),
          W("Did", 2.5, 2.7), W("you?", 2.8, 3.1)]
    out = assign_word_speakers(ws, turns, turns)
    assert [w.speaker for w in out] == ["A", "A", "A", "A", "B", "B"]


def test_real_mid_sentence_change_is_kept() -> None:
    turns = [T(0, 1.5, "A"), T(1.5, 3.0, "B")]
    ws = words_of("so what do you think about it", 0.0, 0.4)
    out = assign_word_speakers(ws, turns, turns)
    assert {w.speaker for w in out} == {"A", "B"}


def test_missing_full_stop_at_a_turn_change_keeps_both_speakers() -> None:
    # ASR glued two turns into one "sentence" (no full stop at the change); A holds 75 % of it,
    # but B's words are a run of their own (5 words, 1.5 s), not jitter: they stay B's
    turns = [T(0, 4.5, "A"), T(4.6, 6.2, "B")]
    ws = words_of("frames that originate in a module that matches each", 0.0, 0.5) + words_of(
        "what we have to transform.", 4.7, 0.3
    )
    out = assign_word_speakers(ws, turns, turns)
    assert [w.speaker for w in out] == ["A"] * 9 + ["B"] * 5
    assert [s.speaker for s in build_segments(out)] == ["A", "B"]


def test_word_outside_turns_goes_to_nearest() -> None:
    turns = [T(0, 1.0, "A"), T(5.0, 6.0, "B")]
    out = assign_word_speakers([W("hm", 4.5, 4.7)], turns, turns)
    assert out[0].speaker == "B"


def test_short_turn_gets_the_word_timed_just_after_it() -> None:
    # pyannote's sample call: Sheila's "Hello?" (1.6-2.3 s here) is timed 2.25-2.45 s by Whisper,
    # mostly in Diane's next turn; a turn with speech and no word draws it back
    turns = [T(0, 1.2, "A"), T(1.6, 2.3, "B"), T(2.3, 4.5, "A")]
    ws = [W("Hello.", 0.1, 1.5), W("Hello.", 2.25, 2.45), W("Oh,", 2.45, 2.6), W("hello.", 2.8, 3.0)]
    out = assign_word_speakers(ws, turns, turns)
    assert [w.speaker for w in out] == ["A", "B", "A", "A"]


def test_turn_without_words_does_not_take_words_from_afar() -> None:
    # a backchannel the ASR dropped ("mm-hm", 5.2-5.6 s) between two turns of A: the words around
    # it lie in A's turns and stay there
    turns = [T(0, 5.0, "A"), T(5.2, 5.6, "B"), T(5.8, 9.0, "A")]
    ws = words_of("and that was the end.", 3.5) + words_of("so then we left.", 5.9)
    out = assign_word_speakers(ws, turns, turns)
    assert {w.speaker for w in out} == {"A"}


def test_change_prefers_a_sentence_end() -> None:
    # B's first word is timed straddling the change; the change goes after A's full stop
    turns = [T(0, 2.0, "A"), T(2.0, 4.0, "B")]
    ws = [W("I", 0.2, 0.4), W("agree.", 0.5, 1.6), W("Well", 1.7, 2.1), W("maybe", 2.2, 2.5), W("not", 2.6, 2.9)]
    out = assign_word_speakers(ws, turns, turns)
    assert [w.speaker for w in out] == ["A", "A", "B", "B", "B"]


def test_words_keep_their_order_through_speakers() -> None:
    # three speakers in turn; every word lies well inside its own turn
    turns = [T(0, 2.0, "A"), T(2.5, 4.0, "B"), T(4.5, 6.0, "C"), T(6.5, 8.0, "A")]
    ws = words_of("one two.", 0.2) + words_of("three four.", 2.7) + words_of("five six.", 4.7) + words_of("seven.", 6.7)
    out = assign_word_speakers(ws, turns, turns)
    assert [w.speaker for w in out] == ["A", "A", "B", "B", "C", "C", "A"]


def test_no_turns_leaves_words_without_speaker() -> None:
    out = assign_word_speakers(words_of("hello there.", 0.0), [], [])
    assert [w.speaker for w in out] == [None, None]


def test_segments_split_at_speaker_change_and_pause() -> None:
    turns = [T(0, 2.0, "A"), T(2.0, 4.0, "B"), T(6.0, 8.0, "B")]
    ws = words_of("hello there.", 0.2) + words_of("hi.", 2.3) + words_of("later on.", 6.2)
    segs = build_segments(assign_word_speakers(ws, turns, turns))
    assert [(s.speaker, s.text) for s in segs] == [("A", "hello there."), ("B", "hi."), ("B", "later on.")]
    assert segs[1].start == 2.3 and [s.id for s in segs] == [0, 1, 2]


def test_relabel_by_first_appearance() -> None:
    names = relabel_speakers([T(5, 6, "SPEAKER_01"), T(0, 1, "SPEAKER_07")])
    assert names == {"SPEAKER_07": "SPEAKER_00", "SPEAKER_01": "SPEAKER_01"}


def test_exports() -> None:
    # (the subtitle layout itself: tests/pipeline/test_exports.py)
    segs = [{"start": 0.5, "end": 61.25, "speaker": "SPEAKER_00", "text": "a --> b"}]
    srt = to_srt(segs)
    assert srt.startswith("1\n00:00:00,500 --> 00:00:12,650\n[SPEAKER_00] a\n\n2\n")
    vtt = to_vtt(segs)
    assert vtt.startswith("WEBVTT") and "\n<v SPEAKER_00>--&gt;\n" in vtt
    rttm = to_rttm([{"start": 1.0, "end": 2.5, "speaker": "SPEAKER_00"}], "job/1")
    assert rttm == "SPEAKER job_1 1 1.000 1.500 <NA> <NA> SPEAKER_00 <NA> <NA>\n"


_times = st.floats(min_value=0.0, max_value=60.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    turns=st.lists(st.tuples(_times, st.floats(0.0, 8.0), st.sampled_from("ABC")), max_size=25),
    words=st.lists(st.tuples(_times, st.floats(0.0, 1.5), st.sampled_from(["so", "yes.", "ok?"])), max_size=60),
)
def test_any_input_gets_one_speaker_per_word(
    turns: list[tuple[float, float, str]], words: list[tuple[float, float, str]]
) -> None:
    # arbitrary diarization (overlapping, zero-length, out of order) and words in time order
    tt = [T(a, a + d, s) for a, d, s in turns]
    ws = [W(text, a, a + d) for a, d, text in sorted(words)]
    out = assign_word_speakers(ws, tt, tt)
    assert [(w.word, w.start, w.end) for w in out] == [(w.word, w.start, w.end) for w in ws]
    speakers = {t.speaker for t in tt}
    assert all((w.speaker in speakers) if speakers else w.speaker is None for w in out)


def test_a_run_of_words_in_another_languages_script_takes_that_language() -> None:
    """A chunk decoded as Korean that ends in English words keeps them English in the result (what
    korean_conv_24s joined around the English sample gave: 'Well, there is not much difference.'
    labelled ko); an acronym inside Korean speech stays Korean; a recording identified in one
    language only is never relabelled."""
    from pipeline.merge import languages_by_script

    texts = ["Well,", "there", "is", "not", "much", "difference.", "아", "진짜요?"]
    assert languages_by_script(texts, ["ko"] * 8, ["ko", "en"]) == ["en"] * 6 + ["ko"] * 2
    acronym = ["이거", "AI", "모델이에요", "OK", "2024년"]
    assert languages_by_script(acronym, ["ko"] * 5, ["ko", "en"]) == ["ko"] * 5
    assert languages_by_script(texts, ["ko"] * 8, ["ko"]) == ["ko"] * 8
    # and the other way: Hangul decoded under an English label
    hangul = ["안녕하세요.", "반갑습니다", "여러분", "Hi"]
    assert languages_by_script(hangul, ["en"] * 4, ["en", "ko"]) == ["ko"] * 3 + ["en"]
