"""Korean (and every language Whisper knows) end to end, with the real embedded models.

- a recording that switches from English to Korean keeps both languages, segment by segment;
- a Korean recording without a language is identified as Korean, transcribed in Hangul;
- options.model: the chosen model is the one that ran; at most N models stay resident;
- a language no configured model serves is refused before any work (CLI, worker, shim);
- espeak-ng's Korean voice tests the plumbing only (language forced, Hangul out, Korean messages);
- through the shim, {"language": "ko", "options": {"locale": "ko"}}: every callback is Korean.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, Proc, Receiver, wait_for_worker, wait_job, which

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def has_hangul(text: str) -> bool:
    return any("\uac00" <= c <= "\ud7a3" for c in text)


@pytest.fixture(scope="module")
def registry() -> Any:
    from ecg_audio.settings import get_settings
    from worker.models import ModelRegistry

    r = ModelRegistry(get_settings())
    r.preload()
    return r


def analyze(source: Path | str, registry: Any, **kw: Any) -> dict[str, Any]:
    from ecg_cli.runner import analyze as run

    env: dict[str, Any] = run(str(source), registry=registry, **kw)
    return env["result"]


@pytest.fixture(scope="module")
def korean_wav(shared_dir: Path) -> Path:
    return shared_dir / "audio" / "korean_conv_24s.wav"


@pytest.fixture(scope="module")
def espeak_korean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make system-deps installs it)")
    out = tmp_path_factory.mktemp("espeak") / "ko.wav"
    text = "안녕하세요. 오늘 회의를 시작하겠습니다. 다음 주 일정에 대해서 이야기해 봅시다."
    subprocess.run(["espeak-ng", "-v", "ko", "-s", "140", "-w", str(out), text], check=True, capture_output=True)
    return out


def test_english_then_korean_keeps_both_languages(
    registry: Any, sample_wav: Path, korean_wav: Path, ffmpeg: str, tmp_path: Path
) -> None:
    mixed = tmp_path / "en_then_ko.wav"
    graph = "[0:a]aresample=16000,aformat=channel_layouts=mono[a];[1:a]aresample=16000,aformat=channel_layouts=mono[b];[a][b]concat=n=2:v=0:a=1"  # noqa: E501
    cmd = [ffmpeg, "-loglevel", "error", "-y", "-i", str(sample_wav), "-i", str(korean_wav)]
    subprocess.run([*cmd, "-filter_complex", graph, "-ac", "1", str(mixed)], check=True)
    result = analyze(mixed, registry)
    langs = [s["language"] for s in result["segments"]]
    assert langs and langs[0] == "en" and langs[-1] == "ko", langs
    first_ko = langs.index("ko")
    assert set(langs[:first_ko]) == {"en"} and set(langs[first_ko:]) == {"ko"}, langs
    assert all(s["start"] >= 29.0 for s in result["segments"] if s["language"] == "ko")  # the sample is 30 s
    assert has_hangul(" ".join(s["text"] for s in result["segments"][first_ko:]))
    md = result["metadata"]
    assert set(md["languages"]) == {"en", "ko"} and md["language_probability"] is not None
    # both models ran, and the metadata says which did what
    assert "tiny.en" in md["models"]["asr"] and "whisper-base" in md["models"]["asr"], md["models"]


def test_korean_is_identified_without_a_language(registry: Any, korean_wav: Path) -> None:
    result = analyze(korean_wav, registry)
    md = result["metadata"]
    assert md["language"] == "ko" and md["language_probability"] > 0.8, md
    assert md["speakers_detected"] >= 2
    text = " ".join(s["text"] for s in result["segments"])
    assert has_hangul(text) and all(s["language"] == "ko" for s in result["segments"])
    assert md["models"]["asr"] == "whisper-base (embedded)"
    # what identifying the language cost, inside the transcribe stage's time
    assert 0 < md["language_id_s"] < md["stage_times"]["transcribe"]


def test_model_option_is_the_model_that_ran(registry: Any, sample_wav: Path) -> None:
    default = analyze(sample_wav, registry, language="en")
    assert default["metadata"]["models"]["asr"] == "tiny.en (embedded)"
    assert default["metadata"]["language_id_s"] == 0  # a language given is not identified
    chosen = analyze(sample_wav, registry, language="en", model="embedded-base")
    assert chosen["metadata"]["models"]["asr"] == "whisper-base (embedded)"
    # the two models decode differently: proof that the choice reached the decoder
    assert [s["text"] for s in default["segments"]] != [s["text"] for s in chosen["segments"]]


def test_least_recently_used_model_is_unloaded() -> None:
    from ecg_audio.settings import get_settings
    from worker.models import ModelRegistry

    r = ModelRegistry(get_settings().model_copy(update={"asr_max_resident": 1}))
    r.asr("en")
    assert r.resident_asr() == ["embedded"]
    r.asr("ko")
    assert r.resident_asr() == ["embedded-base"] and r.unloads["asr:embedded:cpu"] == 1
    r.asr("ko")  # resident: not loaded again
    assert r.loads["asr:embedded-base:cpu"] == 1


def test_unserved_language_is_refused_before_any_work(registry: Any, tmp_path: Path) -> None:
    from pipeline.errors import UnsupportedOptionError

    missing = tmp_path / "no-such-file.wav"  # had anything been fetched, this would be an input error
    with pytest.raises(UnsupportedOptionError, match="ECG_ASR_MULTILINGUAL_MODEL"):
        analyze(missing, registry, language="xx")
    with pytest.raises(UnsupportedOptionError, match="ECG_ASR_MODEL_ALLOWLIST"):
        analyze(missing, registry, model="large-v9")
    # the command line refuses before it loads anything
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "ecg_cli", "analyze", str(missing), "--language", "xx"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "UNSUPPORTED_OPTION" in p.stderr and "ECG_ASR_MULTILINGUAL_MODEL" in p.stderr
    assert "model_loading" not in p.stderr, p.stderr[-2000:]
    print(f"CLI refusal took {time.monotonic() - t0:.1f} s")


def test_korean_plumbing_with_espeak(registry: Any, espeak_korean: Path) -> None:
    """espeak-ng's Korean is poor speech (Whisper base: CER ~0.9), so only the plumbing is checked."""
    progress: list[str] = []
    result = analyze(
        espeak_korean, registry, language="ko-KR", locale="ko", on_progress=lambda s, p, m: progress.append(m)
    )
    md = result["metadata"]
    assert md["language"] == "ko" and md["language_probability"] is None  # forced (ko-KR -> ko), not identified
    assert md["models"]["asr"] == "whisper-base (embedded)"
    assert has_hangul(" ".join(s["text"] for s in result["segments"])), result["segments"]
    assert progress and all(has_hangul(m) for m in progress), progress
    assert progress[-1] == "분석 완료" and "비디오 다운로드 완료" in progress


# --- through the shim -----------------------------------------------------------------


@pytest.fixture(scope="module")
def ready(api: httpx.Client, worker: Proc) -> httpx.Client:
    wait_for_worker(api, worker)
    return api


def test_korean_job_through_the_shim_speaks_korean(ready: httpx.Client, receiver: Receiver, korean_wav: Path) -> None:
    assert (
        ready.post(
            "/api/upload-video/process-video",
            json={"job_id": f"xx-{uuid.uuid4().hex[:6]}", "video_url": "https://example.com/a.mp4", "language": "xx"},
        ).status_code
        == 422
    )
    up = ready.post("/api/uploads", content=korean_wav.read_bytes())
    assert up.status_code == 201
    job_id = f"ko-{uuid.uuid4().hex[:8]}"
    r = ready.post(
        "/api/upload-video/process-video",
        json={
            "job_id": job_id,
            "video_url": up.json()["video_url"],
            "callback_url": receiver.url(),
            "language": "ko",
            "options": {"locale": "ko"},
        },
    )
    assert r.status_code == 202, r.text
    st = wait_job(ready, job_id)
    assert st["status"] == "completed", st
    assert st["message"] == "분석 완료"
    assert st["result"]["metadata"]["language"] == "ko"
    assert has_hangul(" ".join(s["text"] for s in st["result"]["segments"]))
    events = receiver.wait_status(job_id, "completed")
    assert len(events) >= 4 and events[-1]["message"] == "분석 완료"
    assert all(has_hangul(e["message"]) for e in events), [e["message"] for e in events]


def test_errors_speak_the_locale_from_accept_language(ready: httpx.Client, receiver: Receiver) -> None:
    up = ready.post("/api/uploads", content=b"\x00\x01garbage" * 1000).json()["video_url"]
    job_id = f"ko-bad-{uuid.uuid4().hex[:6]}"
    r = ready.post(
        "/api/upload-video/process-video",
        json={"job_id": job_id, "video_url": up, "callback_url": receiver.url()},
        headers={"Accept-Language": "ko-KR,ko;q=0.9,en;q=0.8"},
    )
    assert r.status_code == 202, r.text
    st = wait_job(ready, job_id, timeout=300)
    assert st["status"] == "failed" and st["error_code"] == "INVALID_MEDIA"  # codes unchanged
    assert st["error_message"].startswith("읽을 수 없는 미디어 파일입니다: "), st
    assert st["message"].startswith("실패: 읽을 수 없는 미디어 파일입니다: "), st
    receiver.wait_status(job_id, "failed")
    final = [e for e in receiver.for_job(job_id) if e["status"] == "failed"]
    assert len(final) == 1 and final[0]["message"].startswith("실패: 읽을 수 없는 미디어 파일입니다"), final
