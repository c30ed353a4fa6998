"""Subtitle layout per language (pipeline.exports): lines within the guide's limit, at most two
lines and 7 s a cue, breaks between words only, a new cue per speaker, reading speed within the
guide's figure where the speech allows, and a job's options.subtitles; then the same limits on
real results (pyannote's English sample and a Korean conversation)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import UnsupportedOptionError
from pipeline.exports import (
    FRAME_GAP_S,
    GUIDES,
    MAX_CUE_S,
    Cue,
    cues,
    exports,
    layout_for,
    subtitle_options,
    to_srt,
    to_vtt,
)

EN = (
    "Well, there isn't that much difference. At least, you know, they all call me a Yankee down here. "
    "So I don't really mind it, but my brother, who moved to Atlanta in the spring, thinks the accent "
    "gives him away every single time he orders coffee."
)
KO = (
    "개인적인 질문인데요. 네 웃으시니까 이빨에 투 투스잼이라고 하는 건가요 뭐 하시는 거예요. 신기하네요. "
    "처음 봤어요. 진짜요 떼지나요. 이거 이렇게 하면 이게 거의 저 1년 받을 가는데 아직 한 번도 안 떨어졌고"
)
JA = "今日は|とても|いい|天気|です|ね。|明日|は|友達|と|一緒|に|海|へ|行く|予定|です|が、|雨|が|降ったら|映画|を|見|に|行き|ます。"  # noqa: E501
ZH = "我们|今天|下午|三点|在|公司|门口|见面|，|然后|一起|去|那家|新开|的|餐厅|吃饭|。|你|觉得|怎么样|？|如果|下雨|我们|就|改天|再|去|吧|。"  # noqa: E501


def segment(
    words: Sequence[str], lang: str, cps: float, *, start: float = 0.0, speaker: str = "SPEAKER_00", gap: float = 0.08
) -> dict[str, Any]:
    """A segment whose words are spoken at ``cps`` characters a second, ``gap`` between words."""
    out, t = [], start
    for w in words:
        d = len(w) / cps
        out.append({"word": w, "start": round(t, 3), "end": round(t + d, 3), "speaker": speaker, "score": 0.9})
        t += d + gap
    sep = "" if lang in ("ja", "zh") else " "
    return {
        "id": 0,
        "start": out[0]["start"],
        "end": out[-1]["end"],
        "speaker": speaker,
        "language": lang,
        "text": sep.join(words),
        "words": out,
    }


def split(lang: str) -> list[str]:
    return {"en": EN.split(), "ko": KO.split(), "ja": JA.split("|"), "zh": ZH.split("|")}[lang]


def check_cues(found: Sequence[Cue], segments: Sequence[Mapping[str, Any]], overrides: Any = None) -> None:
    """Every cue within its language's limits; every line whole words of its segment, in order."""
    for c in found:
        layout = layout_for(c.language, overrides)
        assert 1 <= len(c.lines) <= layout.max_lines, c
        assert all(0 < len(line) <= layout.max_chars_per_line for line in c.lines), c
        assert c.end - c.start <= layout.max_cue_s + 1e-6, c
    # no break inside a word: the lines, split back into words, are the segments' words in order
    joined = []
    for c in found:
        sep = "" if c.language in ("ja", "zh") else " "
        for line in c.lines:
            joined += line.split(" ") if sep else [line]
    expected = []
    for s in segments:
        expected += [w["word"] for w in s["words"]] if s["language"] not in ("ja", "zh") else []
    if expected:
        assert joined == expected
    for s in segments:
        if s["language"] in ("ja", "zh"):
            words = [w["word"] for w in s["words"]]
            bounds = {sum(len(w) for w in words[:k]) for k in range(len(words) + 1)}
            text = "".join(line for c in found if c.language == s["language"] for line in c.lines)
            assert text == s["text"]
            pos = 0
            for c in found:
                for line in c.lines:
                    assert pos in bounds and pos + len(line) in bounds, (line, c)  # starts and ends at word edges
                    pos += len(line)


@pytest.mark.parametrize("lang", ["en", "ko", "ja", "zh"])
def test_each_language_keeps_its_guides_limits(lang: str) -> None:
    chars, cps = GUIDES[lang]
    seg = segment(split(lang), lang, cps * 0.8)  # speech a little slower than the guide's reading speed
    found = cues([seg])
    check_cues(found, [seg])
    assert len(found) >= 2  # the long segment became several cues
    assert max(len(line) for c in found for line in c.lines) > chars * 0.6  # lines are used, not one word each
    # slower speech than the guide's reading speed: every cue reads at most at the guide's speed
    assert all(c.cps <= cps + 1e-6 for c in found), [(c.lines, round(c.cps, 1)) for c in found]
    # cues follow each other, never overlap
    assert all(a.end <= b.start for a, b in zip(found, found[1:], strict=False))


def test_the_issue_english_segment_is_two_lines_of_at_most_42() -> None:
    text = "Well, there isn't that much difference. At least, you know, they all call me a Yankee down here. So I don't"
    seg = segment(text.split(), "en", 15.0)
    found = cues([seg])
    check_cues(found, [seg])
    assert len(found) == 2
    assert found[0].lines == ("Well, there isn't that much difference.",)  # cut at the sentence end
    assert "\n".join(found[1].lines) != " ".join(found[1].lines)  # two lines...
    assert abs(len(found[1].lines[0]) - len(found[1].lines[1])) <= 8  # ...of similar length


def test_korean_two_lines_at_spaces_instead_of_one_short_line() -> None:
    seg = segment(split("ko"), "ko", 9.0)
    found = cues([seg])
    check_cues(found, [seg])
    assert any(len(c.lines) == 2 for c in found)
    assert all(not line.startswith(" ") and not line.endswith(" ") for c in found for line in c.lines)


def test_fast_speech_stays_up_into_the_pause_to_be_read() -> None:
    # 30 characters said in 1 s (30 cps), then 3 s of silence before the next speaker
    a = segment(["That", "is", "absolutely", "wonderful."], "en", 30.0)
    b = segment(["Thanks."], "en", 10.0, start=4.0, speaker="SPEAKER_01")
    first, second = cues([a, b])
    assert first.end > a["end"] + 0.5  # kept up after the words...
    assert first.cps <= GUIDES["en"][1] + 1e-6  # ...until it reads at 17 cps
    assert first.end <= second.start  # never into the next cue
    # no room: the next speaker answers at once; the cue ends where the next one starts, no overlap
    b_now = segment(["Thanks."], "en", 10.0, start=a["end"] + 0.1, speaker="SPEAKER_01")
    first, second = cues([a, b_now])
    assert first.end <= second.start and first.end >= a["end"]


def test_a_new_speaker_starts_a_new_cue_and_the_label_prefers_the_name() -> None:
    a = segment(["Hi."], "en", 10.0)
    b = segment(["Hello", "there."], "en", 10.0, start=0.4, speaker="SPEAKER_01")
    b["speaker_name"] = "Kim Min-su"
    found = cues([a, b])
    assert [(c.speaker, c.lines) for c in found] == [("SPEAKER_00", ("Hi.",)), ("Kim Min-su", ("Hello there.",))]
    srt = to_srt([a, b])
    assert "[SPEAKER_00] Hi." in srt and "[Kim Min-su] Hello there." in srt
    assert "<v Kim Min-su>Hello there." in to_vtt([a, b])


def test_a_cue_never_lasts_more_than_7_s_even_for_slow_speech() -> None:
    seg = segment(["네"] * 40, "ko", 0.5)  # one syllable every 2 s
    found = cues([seg])
    assert found and all(c.end - c.start <= MAX_CUE_S + 1e-6 for c in found)


def test_job_overrides_apply_and_bad_ones_are_refused() -> None:
    seg = segment(split("en"), "en", 14.0)
    opts = {"max_chars_per_line": 24, "max_lines": 1, "max_cue_s": 3}
    found = cues([seg], opts)
    check_cues(found, [seg], opts)
    assert all(len(c.lines) == 1 and len(c.lines[0]) <= 24 and c.end - c.start <= 3 + 1e-6 for c in found)
    result = {"segments": [seg], "diarization": [], "metadata": {"subtitles": opts}}
    srt = exports(result, "job")["srt"]
    assert srt == to_srt([seg], opts) and srt != to_srt([seg])
    for bad in ({"max_lines": 0}, {"max_chars_per_line": 4.5}, {"max_cue_s": "7"}, {"font": "Arial"}, ["x"]):
        with pytest.raises(UnsupportedOptionError):
            subtitle_options(bad)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedOptionError, match="max_lines"):
        to_srt([seg], {"max_lines": 9})


def test_formats_escape_and_number() -> None:
    seg = segment(["a", "-->", "<b>", "&", "c"], "en", 10.0)
    vtt = to_vtt([seg])
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ") and "<v SPEAKER_00>a --&gt; &lt;b&gt; &amp; c" in vtt
    srt = to_srt([seg, segment(["next."], "en", 10.0, start=5.0)])
    assert re.match(r"1\n00:00:00,000 --> 00:00:\d\d,\d{3}\n\[SPEAKER_00\] a --> <b> & c\n\n2\n00:00:05,000 --> ", srt)
    # a segment without word times (an older result) is shared out by word length
    old = {"start": 0.5, "end": 3.5, "speaker": "SPEAKER_00", "text": "no word times here"}
    assert to_srt([old]).startswith("1\n00:00:00,500 --> 00:00:03,500\n[SPEAKER_00] no word times here\n")


# --- real results -------------------------------------------------------------------------------


def _real_run(source: Path, **kw: Any) -> dict[str, Any]:
    from ecg_cli.runner import analyze

    return analyze(str(source), **kw)


def figures(found: Sequence[Cue]) -> dict[str, Any]:
    return {
        "cues": len(found),
        "max_line": max(len(line) for c in found for line in c.lines),
        "max_lines": max(len(c.lines) for c in found),
        "max_cue_s": round(max(c.end - c.start for c in found), 2),
        "cps": [round(c.cps, 1) for c in found],
    }


def _check_real(result: dict[str, Any], lang: str) -> None:
    found = cues(result["segments"])
    segs = [s for s in result["segments"] if s.get("words")]
    check_cues(found, segs)
    chars, cps = GUIDES[lang]
    print(lang, figures(found))
    # reading speed: a cue reads faster than the guide only where its words came that fast and the
    # next cue left no room to stay up longer
    for k, c in enumerate(found):
        if c.cps > cps + 1e-6:
            room = found[k + 1].start - c.end if k + 1 < len(found) else math.inf
            assert room <= FRAME_GAP_S + 0.002 or c.end - c.start >= MAX_CUE_S - 1e-6, (c, room)
    assert to_srt(result["segments"]).count(" --> ") == len(found)


@pytest.mark.timeout(900)
def test_real_english_sample_subtitles(sample_wav: Path) -> None:
    layout = {"max_chars_per_line": 30}
    run = _real_run(sample_wav, subtitles=layout)
    _check_real(run["result"], "en")  # the guide's layout (cues() without overrides)
    # the job's own layout: kept in the result, and the files the worker wrote follow it
    assert run["result"]["metadata"]["subtitles"] == layout
    assert run["exports"]["srt"] == exports(run["result"], run["job_id"])["srt"] != to_srt(run["result"]["segments"])
    text_lines = [ln for block in run["exports"]["srt"].split("\n\n") for ln in block.splitlines()[2:]]
    assert text_lines and all(len(re.sub(r"^\[[^]]+\] ", "", ln)) <= 30 for ln in text_lines)


@pytest.mark.timeout(900)
def test_real_korean_conversation_subtitles(shared_dir: Path) -> None:
    wav = shared_dir / "audio" / "korean_conv_24s.wav"
    if not wav.is_file():
        pytest.skip(f"{wav} is absent")
    _check_real(_real_run(wav, language="ko")["result"], "ko")


_word = st.text(alphabet="abcdefghij가나다라마바사今日は。,.?", min_size=1, max_size=18)


@settings(max_examples=150, deadline=None)
@given(
    lang=st.sampled_from(["en", "ko", "ja", "zh"]),
    words=st.lists(st.tuples(_word, st.floats(0.0, 2.0), st.floats(0.0, 1.5)), min_size=1, max_size=60),
    chars=st.none() | st.integers(8, 50),
    lines=st.none() | st.integers(1, 3),
)
def test_any_words_keep_the_limits(
    lang: str, words: list[tuple[str, float, float]], chars: int | None, lines: int | None
) -> None:
    """Random words, times and layouts: no line over its limit, no cue over its lines, no cue over
    7 s unless one word alone lasts longer, every character kept, in order."""
    t, out = 0.0, []
    for text, gap, dur in words:
        out.append({"word": text, "start": round(t + gap, 3), "end": round(t + gap + dur, 3)})
        t += gap + dur
    sep = "" if lang in ("ja", "zh") else " "
    seg = {
        "start": out[0]["start"],
        "end": out[-1]["end"],
        "speaker": "S",
        "language": lang,
        "words": out,
        "text": sep.join(w for w, _, _ in words),
    }
    overrides = {k: v for k, v in {"max_chars_per_line": chars, "max_lines": lines}.items() if v is not None}
    layout = layout_for(lang, overrides)
    found = cues([seg], overrides)
    for c in found:
        assert 1 <= len(c.lines) <= layout.max_lines and all(0 < len(x) <= layout.max_chars_per_line for x in c.lines)
        longest_word = max(w["end"] - w["start"] for w in out)
        assert c.end - c.start <= max(layout.max_cue_s, longest_word) + 1e-3
        assert c.end >= c.start
    assert "".join("".join(c.lines) for c in found).replace(" ", "") == seg["text"].replace(" ", "")
    assert all(a.start <= b.start for a, b in zip(found, found[1:], strict=False))
