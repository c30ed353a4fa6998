"""Whisper's repetition loops ("웃음소리 웃음소리 웃음소리 ...", "thank you thank you ..."):
how to recognise one in a decoded text.

Two tests, either suffices: Whisper's own compression-ratio test (a text that gzip shrinks
more than ``COMPRESSION_RATIO_THRESHOLD`` times is mostly repetition), and an n-gram of up to
``MAX_NGRAM`` words (characters, for text without spaces) repeated back to back at least
``MAX_REPEATS`` times. The compression ratio misses short loops (a 30-character text barely
compresses); the n-gram test catches them and says which phrase looped.
"""

from __future__ import annotations

COMPRESSION_RATIO_THRESHOLD = 2.4  # Whisper's own threshold (transcribe.py, temperature fallback)
COMPRESSION_MIN_CHARS = 40  # shorter texts compress poorly whatever they hold
MAX_NGRAM = 4  # words; characters for text written without spaces: 3x this
MAX_REPEATS = 5  # back-to-back repeats of one n-gram; "no, no, no, no" (4) is still speech


def loop_reason(text: str) -> str | None:
    """Why ``text`` looks like a decoding loop, or None when it does not."""
    from faster_whisper.transcribe import get_compression_ratio

    text = text.strip()
    if not text:
        return None
    phrase, repeats = repeated_ngram(text)
    if repeats >= MAX_REPEATS:
        return f"repetition loop: {phrase[:40]!r} x{repeats}"
    if len(text) > COMPRESSION_MIN_CHARS:
        ratio = get_compression_ratio(text)
        if ratio > COMPRESSION_RATIO_THRESHOLD:
            return f"repetition loop: compression ratio {ratio:.1f} > {COMPRESSION_RATIO_THRESHOLD}"
    return None


def repeated_ngram(text: str) -> tuple[str, int]:
    """The n-gram repeated back to back most often in ``text`` and how many times in a row.

    Words (punctuation stripped) where the text has spaces; characters where it has none
    (Japanese, Chinese), with n-grams three times as long."""
    words = [w.strip(".,!?;:·…。、？！\"'") for w in text.split()]
    tokens = [w for w in words if w] if len(words) > 1 else [c for c in text if not c.isspace()]
    joiner = " " if len(words) > 1 else ""
    longest = MAX_NGRAM if len(words) > 1 else 3 * MAX_NGRAM
    best, best_n = "", 0
    for n in range(1, longest + 1):
        i = 0
        while i + 2 * n <= len(tokens):
            k = 1
            while tokens[i + k * n : i + (k + 1) * n] == tokens[i : i + n]:
                k += 1
            if k > best_n:
                best, best_n = joiner.join(tokens[i : i + n]), k
            i += n * k if k > 1 else 1
    return best, best_n
