"""``ecg-audio``: analyze in-process, submit through the shim, or run the whole stack."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from ecg_audio.jobs import JobStatus, is_terminal
from ecg_audio.messages import LOCALES

DEFAULT_VAR = Path(os.environ.get("ECG_VAR_DIR", "var"))


def _progress_bar(stage: str, progress: int, message: str) -> None:
    width = 30
    filled = int(width * progress / 100)
    end = "\n" if progress >= 100 else ""
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {progress:3d}% {message[:60]:<60}{end}")
    sys.stderr.flush()


def print_who_said_what(envelope: dict[str, Any], out=sys.stdout) -> None:  # type: ignore[no-untyped-def]
    result = envelope.get("result") or {}
    speakers = result.get("speakers", {})
    md = result.get("metadata", {})
    print(
        f"{len(speakers)} speakers, {md.get('segments_created', 0)} segments, "
        f"{md.get('duration', 0):.1f} s of audio, processed in {md.get('processing_time', 0):.1f} s",
        file=out,
    )
    for label, s in speakers.items():
        named = f" ({s['name']})" if s.get("name") else ""
        print(f"  {label}{named}: {s['total_duration']:.1f} s, {s['word_count']} words", file=out)
    for seg in result.get("segments", []):
        m, s = divmod(seg["start"], 60)
        who = seg.get("speaker_name") or seg.get("speaker") or "?"
        print(f"[{int(m):02d}:{s:05.2f}] {who}: {seg['text']}", file=out)


# --- analyze ---------------------------------------------------------------


def _vocabulary_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", help="text the decoder reads first: names and terms spelt right (options.prompt)")
    p.add_argument("--hotwords", help="names and terms to favour while decoding (options.hotwords)")


def cmd_analyze(a: argparse.Namespace) -> int:
    from ecg_audio.logs import configure_logging
    from ecg_cli.runner import analyze

    configure_logging("INFO" if a.verbose else "WARNING", json_output=False)
    from pipeline.errors import AnalysisError

    try:
        from ecg_audio.languages import check_job
        from ecg_audio.settings import get_settings
        from pipeline.exports import subtitle_options

        # refused before any work: a language or model no configured ASR model serves, a bad layout
        choice = check_job(a.language, a.model, get_settings())
        subtitles = subtitle_options(_subtitle_args(a))
        envelope = analyze(
            a.source,
            num_speakers=a.num_speakers,
            min_speakers=a.min_speakers,
            max_speakers=a.max_speakers,
            language=choice.language,
            locale=a.locale,
            model=choice.model,
            subtitles=subtitles or None,
            prompt=a.prompt,
            hotwords=a.hotwords,
            on_progress=None if a.quiet else _progress_bar,
            speakers_dir=a.speakers,
        )
    except AnalysisError as e:
        print(f"\nerror {e.code}: {e.message}", file=sys.stderr)
        return 2
    exports = envelope.pop("exports", {})
    text = json.dumps(envelope, ensure_ascii=False, indent=1)
    if a.output:
        out = Path(a.output)
        out.write_text(text)
        for ext, body in exports.items():
            out.with_suffix(f".{ext}").write_text(body)
        print(f"wrote {out} (+ {', '.join(sorted(exports))})", file=sys.stderr)
    if a.timeline:
        from pipeline.diarize import SpeakerTurn
        from pipeline.timeline import render_timeline

        turns = [SpeakerTurn(t["start"], t["end"], t["speaker"]) for t in envelope["result"]["diarization"]]
        render_timeline(turns, envelope["result"]["metadata"]["duration"], Path(a.timeline), title=Path(a.source).name)
        print(f"wrote {a.timeline}", file=sys.stderr)
    if not a.output:
        print(text)
    elif not a.quiet:
        print_who_said_what(envelope)
    return 0


def _subtitle_args(a: argparse.Namespace) -> dict[str, Any]:
    """options.subtitles from --max-chars-per-line, --max-lines, --max-cue-s (those given)."""
    given = {"max_chars_per_line": a.max_chars_per_line, "max_lines": a.max_lines, "max_cue_s": a.max_cue_s}
    return {k: v for k, v in given.items() if v is not None}


def _add_subtitle_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-chars-per-line", type=int, help="subtitle line length (default: the language's guide)")
    p.add_argument("--max-lines", type=int, help="lines a subtitle cue (default 2)")
    p.add_argument("--max-cue-s", type=float, help="seconds a subtitle cue stays up at most (default 7)")


# --- submit ------------------------------------------------------------------


def _client_config(var_dir: Path) -> tuple[str, str]:
    url = os.environ.get("ECG_SHIM_URL")
    key = os.environ.get("ECG_API_KEY")
    env_file = var_dir / "stack.env"
    if (not url or not key) and env_file.exists():
        values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
        url = url or values.get("ECG_SHIM_URL")
        key = key or values.get("ECG_API_KEY")
    if not url or not key:
        raise SystemExit("no shim configured: run 'ecg-audio up' first, or set ECG_SHIM_URL and ECG_API_KEY")
    return url.rstrip("/"), key


def cmd_submit(a: argparse.Namespace) -> int:
    import httpx

    url, key = _client_config(Path(a.var_dir))
    headers = {"Authorization": f"Bearer {key}"}
    source = a.source
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        if Path(source).is_file():
            with open(source, "rb") as fh:
                r = client.post("/api/uploads", content=fh, headers={"Content-Type": "application/octet-stream"})
            r.raise_for_status()
            source = r.json()["video_url"]
        job_id = a.job_id or f"cli-{uuid.uuid4().hex[:12]}"
        body: dict[str, Any] = {"job_id": job_id, "video_url": source, "options": {}}
        if a.language:
            body["language"] = a.language
        if a.num_speakers:
            body["options"]["num_speakers"] = a.num_speakers
        if a.locale:
            body["options"]["locale"] = a.locale
        if _subtitle_args(a):
            body["options"]["subtitles"] = _subtitle_args(a)
        for name in ("prompt", "hotwords"):
            if getattr(a, name, None):
                body["options"][name] = getattr(a, name)
        r = client.post("/api/upload-video/process-video", json=body)
        if r.status_code >= 400:
            print(f"refused ({r.status_code}): {r.json().get('detail')}", file=sys.stderr)
            return 2
        print(f"job {job_id}: {r.json()['status']}", file=sys.stderr)
        if not a.wait:
            return 0
        last = -1
        while True:
            st = client.get(f"/jobs/{job_id}").json()
            if st["progress"] != last:
                last = st["progress"]
                _progress_bar(st.get("stage") or "", st["progress"], st.get("message") or "")
            if is_terminal(st["status"]):
                break
            time.sleep(0.5)
        if st["status"] == JobStatus.FAILED:
            print(f"\njob failed: {st['error_code']}: {st['error_message']}", file=sys.stderr)
            return 1
        envelope = {"job_id": job_id, "status": JobStatus.COMPLETED, "result": st["result"]}
        if a.output:
            Path(a.output).write_text(json.dumps(envelope, ensure_ascii=False, indent=1))
        print_who_said_what(envelope)
        return 0


# --- up / down ---------------------------------------------------------------


def cmd_up(a: argparse.Namespace) -> int:
    from ops.stack import bring_down, bring_up, wait_ready

    var_dir = Path(a.var_dir)
    redis_url = a.redis_url or os.environ.get("ECG_REDIS_URL") or "redis://127.0.0.1:6379/0"
    stack = bring_up(
        var_dir,
        redis_url=redis_url,
        shim_port=a.port,
        flower_port=a.flower_port,
        flower=not a.no_flower,
        cpu_worker=a.cpu_worker,
        stream_worker=a.stream_worker,
    )
    print(f"waiting for the worker to load its models (logs in {stack.var_dir / 'logs'}) ...", file=sys.stderr)
    try:
        wait_ready(stack, timeout_s=a.timeout)
    except RuntimeError as e:
        print(f"stack failed to start: {e}", file=sys.stderr)
        bring_down(stack.var_dir)
        return 1
    print(f"shim    {stack.shim_url}  (docs: {stack.shim_url}/docs)")
    if not a.no_flower:
        print(
            f"flower  http://127.0.0.1:{stack.flower_port}  (user {stack.flower_user}, password in ECG_FLOWER_PASSWORD"
            f" or {stack.var_dir / 'stack.env'})"
        )
        with open(stack.var_dir / "stack.env", "a") as fh:
            fh.write(f"ECG_FLOWER_USER={stack.flower_user}\nECG_FLOWER_PASSWORD={stack.flower_password}\n")
    print(f"api key in {stack.var_dir / 'stack.env'}")
    print(f"callbacks signed (Standard Webhooks): your secret is GET {stack.shim_url}/webhooks/secret")
    if a.detach:
        return 0
    try:
        while all(p.poll() is None for p in stack.procs.values()):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    bring_down(stack.var_dir)
    return 0


def cmd_down(a: argparse.Namespace) -> int:
    from ops.stack import bring_down

    stopped = bring_down(Path(a.var_dir))
    print("stopped: " + (", ".join(stopped) or "nothing"))
    return 0


def cmd_metrics(a: argparse.Namespace) -> int:
    """Publish the queue-depth metrics that drive the worker Auto Scaling Group."""
    from ecg_audio.logs import configure_logging
    from ops.aws import settings_with_secrets
    from ops.queue_metrics import publish_queue_metrics, run_forever

    settings = settings_with_secrets()
    configure_logging(settings.log_level, settings.log_json)
    if a.once:
        print(json.dumps(publish_queue_metrics()))
        return 0
    try:
        run_forever(a.interval, settings=settings)
    except KeyboardInterrupt:
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ecg-audio", description="Who said what, when.")
    sub = p.add_subparsers(dest="cmd", required=True)

    an = sub.add_parser("analyze", help="run the pipeline in this process (no broker)")
    an.add_argument("source", help="a media file or URL")
    an.add_argument("-o", "--output", help="write the result JSON here (and .srt/.vtt/.rttm beside it)")
    an.add_argument("--num-speakers", type=int)
    an.add_argument("--min-speakers", type=int)
    an.add_argument("--max-speakers", type=int)
    an.add_argument("--language", help="ISO 639-1 code (en, ko, ja ...); default: identified per stretch of speech")
    an.add_argument("--locale", choices=LOCALES, help="language of progress messages (default ECG_DEFAULT_LOCALE)")
    an.add_argument("--model", help="ASR model, one of the configured ones (ECG_ASR_MODEL_ALLOWLIST)")
    _vocabulary_arguments(an)
    an.add_argument("--timeline", help="also draw who spoke when into this PNG")
    _add_subtitle_args(an)
    an.add_argument(
        "--speakers", metavar="DIR", help="name speakers from voice samples in DIR: NAME.wav or NAME/*.wav, 5-60 s"
    )
    an.add_argument("-q", "--quiet", action="store_true")
    an.add_argument("-v", "--verbose", action="store_true", help="log each stage")
    an.set_defaults(func=cmd_analyze)

    sb = sub.add_parser("submit", help="send a job through the shim")
    sb.add_argument("source", help="a media file (uploaded) or URL")
    sb.add_argument("--wait", action="store_true", help="show progress and print who said what")
    sb.add_argument("--job-id")
    sb.add_argument("--language")
    sb.add_argument("--num-speakers", type=int)
    sb.add_argument("--locale", choices=LOCALES, help="language of the job's progress and error messages")
    _vocabulary_arguments(sb)
    sb.add_argument("-o", "--output")
    _add_subtitle_args(sb)
    sb.add_argument("--var-dir", default=str(DEFAULT_VAR))
    sb.set_defaults(func=cmd_submit)

    up = sub.add_parser("up", help="start Redis (if none is reachable), a worker, the shim and Flower")
    up.add_argument("--var-dir", default=str(DEFAULT_VAR))
    up.add_argument("--redis-url")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--flower-port", type=int, default=5555)
    up.add_argument("--no-flower", action="store_true")
    up.add_argument("--cpu-worker", action="store_true", help="a second worker for the cpu queue (GPU machines)")
    up.add_argument("--stream-worker", action="store_true", help="a stream worker too, for WS /v1/stream")
    up.add_argument("--detach", action="store_true", help="return once ready; stop with 'ecg-audio down'")
    up.add_argument("--timeout", type=float, default=600)
    up.set_defaults(func=cmd_up)

    mt = sub.add_parser("metrics", help="publish QueueLength and BacklogPerInstance to CloudWatch")
    mt.add_argument("--interval", type=float, help="seconds between rounds (default ECG_METRICS_INTERVAL_S)")
    mt.add_argument("--once", action="store_true", help="publish one round, print it, exit")
    mt.set_defaults(func=cmd_metrics)

    from ecg_cli import speakers

    speakers.add_parser(sub, str(DEFAULT_VAR), _client_config)
    from ecg_cli import stream

    stream.add_parsers(sub, str(DEFAULT_VAR), _client_config)

    dn = sub.add_parser("down", help="stop what 'up --detach' started")
    dn.add_argument("--var-dir", default=str(DEFAULT_VAR))
    dn.set_defaults(func=cmd_down)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
