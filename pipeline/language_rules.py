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
