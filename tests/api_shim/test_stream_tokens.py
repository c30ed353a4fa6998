"""Stream tokens (``POST /v1/stream/token``, ``?token=`` on ``WS /v1/stream``): signed like the job
page links, bound to the key that asked, short-lived."""

from __future__ import annotations

from api_shim.view_tokens import check_token, make_stream_token, make_token, stream_token_owner

SECRET = b"s" * 32
FP = "0123456789abcdef0123456789abcdef"


def test_a_stream_token_names_its_key_until_it_expires() -> None:
    token = make_stream_token(SECRET, FP, expires=1_000)
    assert stream_token_owner(SECRET, token, now=999) == FP
    assert stream_token_owner(SECRET, token, now=1_001) is None
    assert stream_token_owner(b"other" * 8, token, now=999) is None


def test_a_stream_token_cannot_be_moved_to_another_key_or_used_as_a_page_link() -> None:
    token = make_stream_token(SECRET, FP, expires=1_000)
    other = "f" * 32 + token[len(FP) :]
    assert stream_token_owner(SECRET, other, now=999) is None
    assert not check_token(SECRET, FP, token.partition(".")[2], now=999)  # not a page link of a job named FP
    page = make_token(SECRET, "job-1", 1_000)
    assert stream_token_owner(SECRET, f"{FP}.{page}", now=999) is None
    assert stream_token_owner(SECRET, "garbage", now=999) is None
