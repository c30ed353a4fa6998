"""The rules for a job's vocabulary (``options.prompt``, ``options.hotwords``), in one place for
the shim's schema and the command line."""

from __future__ import annotations

PROMPT_MAX_CHARS = 1000  # Whisper reads at most its last 223 tokens: longer text is a mistake, not a prompt
HOTWORDS_MAX_CHARS = 500
LIMITS = {"prompt": PROMPT_MAX_CHARS, "hotwords": HOTWORDS_MAX_CHARS}


def vocabulary_problem(name: str, text: str | None) -> str | None:
    """What is wrong with ``options.<name>`` (``prompt`` or ``hotwords``), or None."""
    if text is None:
        return None
    if not text.strip():
        return f"{name} is empty"
    if len(text) > LIMITS[name]:
        return f"{name} has {len(text)} characters; at most {LIMITS[name]} characters"
    if any(ord(c) < 32 and c not in "\n\t" for c in text):
        return f"{name} must be printable text"
    return None
