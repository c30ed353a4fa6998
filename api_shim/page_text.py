"""The job page's words in the job's locale (``options.locale``: English or Korean).

The page's HTML carries ``{{key}}`` placeholders, filled here server-side (so the page reads in
its language before any script runs); the texts the script writes later (status names, download
labels, durations) travel in the page as a JSON data block, which the Content-Security-Policy
allows because it is never executed. Locales and the progress messages are those of
``ecg_audio.messages``; this catalog adds the page's own words.
"""

from __future__ import annotations

import html
import json
import re

from ecg_audio.jobs import JobStatus
from ecg_audio.messages import Locale, resolve_locale, text

# key -> {locale: text}
PAGE: dict[str, dict[str, str]] = {
    "page_title": {"en": "Job — ECG Audio Analyzer", "ko": "작업 — ECG 오디오 분석기"},
    "job_title": {"en": "{job} — ECG Audio Analyzer", "ko": "{job} — ECG 오디오 분석기"},
    "heading": {"en": "Who said what, when", "ko": "누가 언제 무엇을 말했나"},
    "job": {"en": "Job", "ko": "작업"},
    "loading": {"en": "loading", "ko": "불러오는 중"},
    "speakers_over_time": {"en": "Speakers over time", "ko": "시간대별 화자"},
    "talk_time": {"en": "Talk time", "ko": "발화 시간"},
    "speaker": {"en": "Speaker", "ko": "화자"},
    "share": {"en": "Share", "ko": "비율"},
    "segments": {"en": "Segments", "ko": "구간 수"},
    "words": {"en": "Words", "ko": "단어 수"},
    "downloads": {"en": "Downloads", "ko": "다운로드"},
    "transcript": {"en": "Transcript", "ko": "녹취록"},
    "progress": {"en": "Progress", "ko": "진행률"},
    "live_note": {
        "en": "Live: speakers and words as they are heard. When the stream ends, the refined result replaces them.",
        "ko": "실시간: 들리는 대로 화자와 말을 보여 줍니다. 스트림이 끝나면 정제된 결과로 바뀝니다.",
    },
    "hearing": {"en": "Hearing", "ko": "듣는 중"},
    # written by the script
    # a status is shown by its own name in English
    **{
        f"status.{status}": {"en": status.value, "ko": ko}
        for status, ko in (
            (JobStatus.QUEUED, "대기 중"),
            (JobStatus.PROCESSING, "처리 중"),
            (JobStatus.COMPLETED, "완료"),
            (JobStatus.FAILED, "실패"),
        )
    },
    "status.live": {"en": "live", "ko": "실시간"},  # the job is still a live stream (api_shim.routes.view)
    "live_ended": {"en": "the stream ended without a job", "ko": "스트림이 작업 없이 끝났습니다"},
    "stage": {"en": "stage: {stage}", "ko": "단계: {stage}"},
    "job_failed": {"en": "the job failed", "ko": "작업이 실패했습니다"},
    "export.srt": {"en": "SRT subtitles", "ko": "SRT 자막"},
    "export.vtt": {"en": "WebVTT", "ko": "WebVTT 자막"},
    "export.rttm": {"en": "RTTM (speakers)", "ko": "RTTM (화자 구간)"},
    "export.txt": {"en": "Plain text", "ko": "텍스트"},
    "seconds": {"en": "{s} s", "ko": "{s}초"},
    "minutes": {"en": "{m} min {s} s", "ko": "{m}분 {s}초"},
    "timeline_label": {"en": "speaker timeline", "ko": "화자 타임라인"},
}

_PLACEHOLDER = re.compile(r"\{\{([a-z_.]+)\}\}")


def page_locale(request: dict[str, object], default: str) -> Locale:
    """The job's locale: its ``options.locale`` (set from Accept-Language at submission when the
    job named none), else the deployment's default."""
    options = request.get("options")
    chosen = options.get("locale") if isinstance(options, dict) else None
    return resolve_locale(chosen if isinstance(chosen, str) else None, default)


def catalog(locale: str) -> dict[str, str]:
    """Every text of the page in ``locale`` (English where a text has no translation)."""
    loc = resolve_locale(locale)
    out = {key: texts.get(loc, texts["en"]) for key, texts in PAGE.items()}
    out["done"] = text("done", loc)  # the progress message the worker's final event says too
    return out


def render_page(template: str, locale: str) -> str:
    """``template`` with its ``{{key}}`` placeholders in ``locale``; ``{{lang}}`` is the locale and
    ``{{texts}}`` the catalog as JSON for the script."""
    words = catalog(locale)
    # inside <script type="application/json">: no "</script>" may end the block early
    as_json = json.dumps(words, ensure_ascii=False).replace("<", "\\u003c")

    def fill(m: re.Match[str]) -> str:
        key = m.group(1)
        if key == "lang":
            return resolve_locale(locale)
        if key == "texts":
            return as_json
        return html.escape(words[key])

    return _PLACEHOLDER.sub(fill, template)
