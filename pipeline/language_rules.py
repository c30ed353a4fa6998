"""How each language is written, as far as the stages care: where words join without spaces,
which languages are scored by characters, and which subtitles are cut by characters.

Plain data, no imports: the merge stage, the command line and the benches read it, and
``ecg_audio.languages`` passes it on to the layers above.
"""

from __future__ import annotations

# languages written without spaces between words: their words join without spaces, and they
# are scored by characters (CER), not words
UNSPACED_LANGUAGES = frozenset({"ja", "zh", "yue", "th", "lo", "km", "my", "bo"})
# Korean puts spaces between words, but a Korean "word" (eojeol) carries its particles, so one
# wrong particle fails the whole word: Korean is scored by characters too, as is customary
CER_LANGUAGES = UNSPACED_LANGUAGES | {"ko"}
# subtitle lines are cut by characters and duration (not at word boundaries) for these
CHARACTER_SUBTITLE_LANGUAGES = frozenset({"ko", "ja", "zh", "yue"})

# Letters of the scripts that tell languages apart in a mixed recording (code point ranges).
SCRIPT_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "latin": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F)),
    "hangul": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7A3)),
    "kana": ((0x3040, 0x30FF),),
    "han": ((0x3400, 0x4DBF), (0x4E00, 0x9FFF)),
    "cyrillic": ((0x400, 0x4FF),),
}
# The scripts each language is written in, for the languages whose script is unambiguous here
# (a language not listed is never relabelled, nor relabelled to).
LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    "ko": frozenset({"hangul"}),
    "ja": frozenset({"kana", "han"}),
    "zh": frozenset({"han"}),
    "yue": frozenset({"han"}),
    **{lang: frozenset({"cyrillic"}) for lang in ("ru", "uk", "be", "bg", "sr", "mk", "kk")},
    **{
        lang: frozenset({"latin"})
        for lang in ("en", "fr", "de", "es", "it", "pt", "nl", "sv", "da", "no", "nn", "fi", "pl", "cs", "sk")
        + ("sl", "hr", "ro", "hu", "tr", "id", "ms", "vi", "ca", "gl", "eu", "et", "lv", "lt", "tl", "af", "sw")
    },
}


def scripts_of(text: str) -> frozenset[str]:
    """The scripts of ``text``'s letters (empty for digits and punctuation alone)."""
    found = set()
    for ch in text:
        cp = ord(ch)
        for script, ranges in SCRIPT_RANGES.items():
            if any(a <= cp <= b for a, b in ranges):
                found.add(script)
                break
    return frozenset(found)
