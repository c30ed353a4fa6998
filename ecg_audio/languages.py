"""Which languages and ASR models a job may ask for: the one rule that the shim (at submission),
the command line and the worker (before extraction) all apply, so a job that cannot be served
is refused before any work, everywhere with the same message.

No torch, no model loading here: the rule reads settings only.
"""

from __future__ import annotations

from dataclasses import dataclass

from ecg_audio.settings import EMBEDDED, Settings
from pipeline.errors import UnsupportedOptionError
from pipeline.language_rules import CER_LANGUAGES, CHARACTER_SUBTITLE_LANGUAGES, UNSPACED_LANGUAGES

__all__ = [
    "CER_LANGUAGES",
    "CHARACTER_SUBTITLE_LANGUAGES",
    "UNSPACED_LANGUAGES",
    "UnsupportedOptionError",
    "check_job",
    "normalize",
]

EMBEDDED_MULTILINGUAL = "embedded-base"  # pipeline.asr_models.EMBEDDED_MULTILINGUAL
# Whisper's language codes (faster_whisper.tokenizer._LANGUAGE_CODES, copied: the shim must not
# import faster-whisper). Every multilingual Whisper model knows all of them.
WHISPER_LANGUAGES = frozenset(
    "af am ar as az ba be bg bn bo br bs ca cs cy da de el en es et eu fa fi fo fr gl gu ha haw he hi hr ht hu "
    "hy id is it ja jw ka kk km kn ko la lb ln lo lt lv mg mi mk ml mn mr ms mt my ne nl nn no oc pa pl ps pt "
    "ro ru sa sd si sk sl sn so sq sr su sv sw ta te tg th tk tl tr tt uk ur uz vi yi yo zh yue".split()
)
_ALIASES = {"english": "en", "korean": "ko", "japanese": "ja", "chinese": "zh", "iw": "he", "jv": "jw"}


def normalize(language: str | None) -> str | None:
    """'ko', 'KO', 'ko-KR', 'ko_KR', 'korean' -> 'ko'; None -> None (to be identified)."""
    if not language:
        return None
    code = language.strip().lower().replace("_", "-")
    code = _ALIASES.get(code, code)
    if code in WHISPER_LANGUAGES:
        return code
    base = code.split("-", 1)[0]
    return _ALIASES.get(base, base)


def is_english_only(model: str) -> bool:
    """tiny.en, base.en ... and the embedded tiny.en: they decode English only."""
    return model == EMBEDDED or model.rstrip("/").endswith(".en")


def allowed_models(settings: Settings) -> list[str]:
    names = [settings.asr_model]
    if settings.asr_multilingual_model:
        names.append(settings.asr_multilingual_model)
    names += [m for m in settings.asr_model_allowlist if m not in names]
    return names


@dataclass(frozen=True)
class LanguageChoice:
    language: str | None  # None: identify it
    model: str | None  # options.model, checked against the allowlist


def check_job(language: str | None, model: str | None, settings: Settings) -> LanguageChoice:
    """Normalise and check a job's language and model; ``UnsupportedOptionError`` (whose message
    says what to configure) when no configured model can serve them."""
    if model is not None and model not in allowed_models(settings):
        raise UnsupportedOptionError(
            f"options.model {model!r} is not one of this deployment's ASR models "
            f"({', '.join(allowed_models(settings))}); an operator can add it to ECG_ASR_MODEL_ALLOWLIST"
        )
    code = normalize(language)
    if code is not None and code not in WHISPER_LANGUAGES:
        raise UnsupportedOptionError(
            f"language {language!r} is not one Whisper knows; give an ISO 639-1 code such as 'en', 'ko' or "
            "'ja', or leave it out to have the language identified. The languages served are set on the "
            "workers: ECG_ASR_MODEL (English with the default tiny.en) and ECG_ASR_MULTILINGUAL_MODEL "
            "(every Whisper language; default 'embedded-base')"
        )
    if code is not None and code != "en":
        chosen = [model] if model else [settings.asr_model, settings.asr_multilingual_model]
        if all(m is None or is_english_only(m) for m in chosen):
            what = f"options.model {model!r} is" if model else f"the configured ASR model ({settings.asr_model!r}) is"
            raise UnsupportedOptionError(
                f"language {code!r} needs a multilingual ASR model, but {what} English-only; choose a "
                "multilingual model, or have an operator set ECG_ASR_MULTILINGUAL_MODEL (e.g. 'embedded-base' "
                "or 'large-v3') on the workers"
            )
    return LanguageChoice(language=code, model=model)


def aligner_name(language: str | None, settings: Settings) -> str | None:
    """The wav2vec2 aligner for ``language``: its entry in ECG_ALIGNMENT_MODELS, else the one
    ECG_ALIGNMENT_MODEL names for every language, else None (Whisper's own word times)."""
    code = normalize(language)
    if code and code in settings.alignment_models:
        return settings.alignment_models[code]
    return settings.alignment_model or None
