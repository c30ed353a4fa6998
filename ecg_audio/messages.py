"""What a job's progress and errors say, in English and Korean.

Milestones and progress steps have stable keys; the stage table and the stage bodies report
keys, and the reporter renders each once, in the job's locale (``text``), so the job record
(``/jobs/{id}``), the callbacks and the command line's progress bar all speak the job's
language. Error codes never change; only the message a person reads does.

No torch, no Celery: the shim, the workers and the command line all import this.
"""

from __future__ import annotations

from typing import Literal, get_args

from pipeline.errors import (
    CancelledError,
    DownloadError,
    GPUMemoryError,
    InvalidMediaError,
    NoStreamSlotError,
    ProcessingError,
    StageCrashedError,
    StageTimeoutError,
    StreamWorkerLostError,
    UnsupportedOptionError,
)

Locale = Literal["en", "ko"]
LOCALES: tuple[str, ...] = get_args(Locale)

# key -> {locale: text}
MESSAGES: dict[str, dict[str, str]] = {
    # the milestones (one per entry of tasks.stages.STAGES, and the two inside a stage)
    "input_ready": {"en": "Input ready: audio extracted", "ko": "비디오 다운로드 완료"},
    "vad": {"en": "Voice activity detected", "ko": "음성 구간 감지 완료"},
    "speakers": {"en": "Speakers found", "ko": "화자 식별 완료"},
    "transcription": {"en": "Transcription done", "ko": "음성을 텍스트로 변환 완료"},
    "word_times": {"en": "Word timestamps done", "ko": "단어 시간 정렬 완료"},
    "features": {"en": "Voice features measured", "ko": "음성 특징 측정 완료"},
    "assembling": {"en": "Assembling the result", "ko": "결과 정리 중..."},
    "done": {"en": "Done", "ko": "분석 완료"},
    # progress within a stage
    "vad.running": {"en": "Detecting voice activity", "ko": "음성 구간 감지 중..."},
    "speakers.running": {"en": "Finding speakers", "ko": "화자 식별 중..."},
    "transcription.running": {"en": "Transcribing", "ko": "음성을 텍스트로 변환 중..."},
    "word_times.running": {"en": "Timing words", "ko": "단어 시간 정렬 중..."},
    "features.running": {"en": "Measuring voices", "ko": "음성 특징 측정 중..."},
    # the record's own states
    "job.queued": {"en": "Queued", "ko": "대기 중"},
    "job.requeued": {"en": "Requeued by operator", "ko": "운영자가 다시 대기열에 넣음"},
    "job.failed": {"en": "Failed: {error}", "ko": "실패: {error}"},
}

# error code (pipeline.errors, the one definition of each) -> what it means, for a person (the detail
# after it stays as the worker wrote it)
ERRORS: dict[str, dict[str, str]] = {
    DownloadError.code: {"en": "The input could not be downloaded", "ko": "입력 파일을 내려받지 못했습니다"},
    InvalidMediaError.code: {"en": "The input is not readable media", "ko": "읽을 수 없는 미디어 파일입니다"},
    UnsupportedOptionError.code: {"en": "This option is not available", "ko": "지원하지 않는 옵션입니다"},
    ProcessingError.code: {"en": "The analysis failed", "ko": "분석 중 오류가 발생했습니다"},
    GPUMemoryError.code: {"en": "Out of GPU memory", "ko": "GPU 메모리가 부족합니다"},
    StageTimeoutError.code: {"en": "A stage took too long", "ko": "처리 시간이 초과되었습니다"},
    CancelledError.code: {"en": "The job was cancelled", "ko": "작업이 취소되었습니다"},
    StageCrashedError.code: {"en": "The stage kept crashing", "ko": "처리 단계가 반복해서 중단되었습니다"},
    StreamWorkerLostError.code: {
        "en": "The live transcription worker stopped; reconnect to continue",
        "ko": "실시간 전사 작업자가 멈췄습니다. 다시 연결하세요",
    },
    NoStreamSlotError.code: {"en": "No live transcription slot is free", "ko": "실시간 전사 슬롯이 모두 사용 중입니다"},
}

# details of an error that the catalog has in Korean too (AnalysisError.key; its values fill the
# braces). The English text is the one the error carries (pipeline.media builds "not_media")
ERROR_DETAILS: dict[str, dict[str, str]] = {
    "not_media": {"ko": "오디오나 비디오 파일이 아닙니다. 내용은 {kind}입니다"},
    "not_media_named": {"ko": "확장자({suffix})와 달리 오디오나 비디오 파일이 아닙니다. 내용은 {kind}입니다"},
}
# pipeline.media.NOT_MEDIA_KINDS in Korean (a test keeps the two key sets equal)
NOT_MEDIA_KINDS_KO: dict[str, str] = {
    "html": "HTML 웹 페이지",
    "xml": "XML 문서",
    "json": "JSON 텍스트",
    "pdf": "PDF 문서",
    "zip": "ZIP 압축 파일(또는 오피스 문서)",
    "gzip": "gzip 압축 파일",
    "png": "PNG 이미지",
    "jpeg": "JPEG 이미지",
    "gif": "GIF 이미지",
    "playlist": "미디어가 아닌 재생 목록(M3U)",
    "text": "일반 텍스트",
}


def resolve_locale(locale: str | None, default: str = "en") -> Locale:
    """'ko', 'ko-KR', 'KO' -> 'ko'; an Accept-Language value ('ko-KR,ko;q=0.9,en;q=0.8') -> its
    first supported language; anything else -> ``default``."""
    for part in (locale or "").split(","):
        code = part.split(";", 1)[0].strip().lower().replace("_", "-").split("-", 1)[0]
        if code in LOCALES:
            return code  # type: ignore[return-value]
    return default if default in LOCALES else "en"  # type: ignore[return-value]


def text(key: str, locale: str | None, **values: str) -> str:
    """The message ``key`` in ``locale`` (English when it has no translation)."""
    texts = MESSAGES[key]
    return texts.get(resolve_locale(locale), texts["en"]).format(**values)


def _detail(detail: str, loc: str, key: str | None, values: dict[str, str] | None) -> str:
    """The error's detail in ``loc`` where the catalog has it (by ``key``), else as written."""
    v = dict(values or {})
    if key == "not_media":
        v["kind"] = NOT_MEDIA_KINDS_KO.get(v.get("kind", ""), v.get("kind", "")) if loc == "ko" else v.get("kind", "")
        key = "not_media_named" if v.get("suffix") else key
    texts = ERROR_DETAILS.get(key or "", {})
    try:
        return texts[loc].format(**v) if loc in texts else detail
    except (KeyError, IndexError):  # values that do not fit the text: the English detail is still right
        return detail


def error_message(
    code: str, detail: str, locale: str | None, *, key: str | None = None, values: dict[str, str] | None = None
) -> str:
    """A failure's message for a person in ``locale``: the code's meaning, then the detail (in
    ``locale`` too where the catalog has the error's ``key``)."""
    loc = resolve_locale(locale)
    if loc == "en" or code not in ERRORS:
        return detail
    return f"{ERRORS[code][loc]}: {_detail(detail, loc, key, values)}"


def failed(
    code: str, detail: str, locale: str | None, *, key: str | None = None, values: dict[str, str] | None = None
) -> str:
    """The record's message when a job fails ('Failed: ...' in English)."""
    return text("job.failed", locale, error=error_message(code, detail, locale, key=key, values=values))
