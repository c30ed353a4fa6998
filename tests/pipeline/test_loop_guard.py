"""The loop guard's two tests on decoded text: n-grams repeated back to back, and the compression ratio."""

from __future__ import annotations

import pytest

from pipeline.loop_guard import MAX_REPEATS, loop_reason, repeated_ngram


@pytest.mark.parametrize(
    "text",
    [
        "웃음소리 " * 30,  # the one-hour Korean file of Whisper-WebUI #238
        "thank you " * 20,
        "m " * 60,
        "So I said, I said, I said, I said, I said, I said it again.",  # short: compresses too little
        "ははははははははははははははははははははははははは" * 2,  # no spaces: characters
    ],
)
def test_loops_are_caught(text: str) -> None:
    assert loop_reason(text), text


@pytest.mark.parametrize(
    "text",
    [
        "And I'm Sheila in Texas, originally from Chicago. Oh, I'm from Chicago also.",
        "No, no, no, no. That is not what I meant.",  # four in a row is still speech
        "네 안 떨어져요. 세게 안 닦아요. 세게 닦아도 안 떨어져요.",
        "",
    ],
)
def test_speech_is_not_a_loop(text: str) -> None:
    assert loop_reason(text) is None, (text, repeated_ngram(text))


def test_the_reason_names_the_phrase() -> None:
    phrase, repeats = repeated_ngram("well " + "you know what " * 7 + "fine")
    assert (phrase, repeats) == ("you know what", 7)
    assert repeats >= MAX_REPEATS
    assert "'you know what' x7" in str(loop_reason("well " + "you know what " * 7 + "fine"))
