#!/usr/bin/env python3
"""Quality bench: WER, DER and cpWER of the whole pipeline on the evaluation set.

Runs ``ecg_cli.runner.analyze`` (in-process, the embedded models unless settings
say otherwise) on each file, scores it with ``../shared/tools/score.py`` — the one
scorer everybody uses — and prints one JSON line per file and one with totals.

Evaluation set: pyannote's bundled sample call (stm + rttm in the package) and,
from ../shared/audio: conv_2spk_10min, conv_3spk_overlap_3min, jfk.flac (1 speaker),
stereo_diarization.wav mixed to mono (2 speakers), korean_conv_24s (real Korean). Languages
whose words are not space separated, and Korean, are scored by characters (``cer``), not words.

usage: bench/quality.py [--files sample,conv2,conv3,jfk,stereo,korean] [--extra DIR]... [--heldout DIR]

``--extra DIR`` adds every ``NAME.wav`` in DIR that has ``NAME.json`` and ``NAME.rttm``
beside it (what ``../shared/tools/make_conversation.py`` writes): calls the pipeline was
not tuned on, to check that a change helps in general and not only on the set above.
``--heldout DIR`` first makes the 19 calls of ``HELDOUT`` there (2-6 speakers, 1.5-8
minutes, some overlapped; needs ``espeak-ng``; kept for the next run), then adds them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import Any

from bench.harness import SHARED
from pipeline.language_rules import CER_LANGUAGES


def eval_set(tmp: Path) -> dict[str, dict[str, Any]]:
    from pipeline.diarize import bundled_sample
    from pipeline.media import ffmpeg_exe

    sample = bundled_sample().parent
    audio = SHARED / "audio"
    files: dict[str, dict[str, Any]] = {
        "sample": {"wav": sample / "sample.wav", "ref": sample / "sample.stm", "rttm": sample / "sample.rttm"},
    }
    if audio.is_dir():
        files["conv2"] = {
            "wav": audio / "conv_2spk_10min.wav",
            "ref": audio / "conv_2spk_10min.json",
            "rttm": audio / "conv_2spk_10min.rttm",
        }
        files["conv3"] = {
            "wav": audio / "conv_3spk_overlap_3min.wav",
            "ref": audio / "conv_3spk_overlap_3min.json",
            "rttm": audio / "conv_3spk_overlap_3min.rttm",
        }
        jfk_txt = tmp / "jfk.txt"
        jfk_txt.write_text(
            "And so my fellow Americans, ask not what your country can do for you, "
            "ask what you can do for your country."
        )
        files["jfk"] = {"wav": audio / "jfk.flac", "ref": jfk_txt, "rttm": None, "speakers": 1}
        mono = tmp / "stereo_mono.wav"
        subprocess.run(
            [
                ffmpeg_exe(),
                "-loglevel",
                "error",
                "-y",
                "-i",
                str(audio / "stereo_diarization.wav"),
                "-ac",
                "1",
                str(mono),
            ],
            check=True,
        )
        stereo_txt = tmp / "stereo.txt"
        stereo_txt.write_text(
            "He began a confused complaint against the wizard, who had vanished behind the curtain "
            "on the left. The horizon seems extremely distant."
        )
        files["stereo"] = {"wav": mono, "ref": stereo_txt, "rttm": None, "speakers": 2}
        # real Korean (an interview); the reference has no speaker labels: scored by characters
        files["korean"] = {
            "wav": audio / "korean_conv_24s.wav",
            "ref": audio / "korean_conv_24s.json",
            "rttm": None,
            "unlabelled": True,  # one reference turn for 2+ voices: no DER
        }
    else:
        print(f"../shared is absent ({SHARED}): only pyannote's sample is scored", file=sys.stderr)
    return files


# (name, speakers, seed, overlap probability, minutes) for make_conversation.py
HELDOUT = [
    ("h21", 2, 21, 0.0, 3),
    ("h22", 3, 22, 0.1, 3),
    ("h23", 4, 23, 0.0, 3),
    ("h24", 2, 24, 0.2, 3),
    ("h25", 3, 25, 0.0, 3),
    ("h26", 5, 26, 0.1, 3),
    ("h31", 2, 31, 0.15, 4),
    ("h32", 3, 32, 0.3, 3),
    ("h33", 4, 33, 0.05, 3),
    ("h34", 2, 34, 0.0, 5),
    ("h35", 3, 35, 0.2, 3),
    ("h36", 6, 36, 0.1, 4),
    ("h41", 4, 41, 0.1, 2),
    ("h42", 5, 42, 0.0, 2),
    ("h43", 6, 43, 0.1, 2.5),
    ("h44", 4, 44, 0.2, 2),
    ("h45", 5, 45, 0.05, 3),
    ("h46", 3, 46, 0.0, 1.5),
    ("h47", 2, 47, 0.1, 8),
]


def make_heldout(folder: Path) -> bool:
    """The HELDOUT calls in ``folder`` (made once); False when they cannot be made here."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [h for h in HELDOUT if not (folder / f"{h[0]}.json").exists()]
    if missing and not shutil.which("espeak-ng"):
        print(
            "--heldout: espeak-ng is not installed (apt-get install espeak-ng); held-out calls skipped", file=sys.stderr
        )
        return False
    tool = SHARED / "tools" / "make_conversation.py"
    for name, speakers, seed, overlap, minutes in missing:
        args = [str(folder), name, "--speakers", str(speakers), "--seed", str(seed), "--overlap", str(overlap)]
        subprocess.run([sys.executable, str(tool), *args, "--minutes", str(minutes)], check=True, stdout=sys.stderr)
    return True


def score(result_json: Path, ref: Path, rttm: Path | None) -> dict[str, Any]:
    cmd = [sys.executable, str(SHARED / "tools" / "score.py"), str(result_json), str(ref)]
    if rttm:
        cmd += ["--rttm", str(rttm)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _normalize_chars(text: str) -> str:
    """Characters that count for CER: no spaces, no punctuation, case folded."""
    return "".join(c for c in unicodedata.normalize("NFC", text).casefold() if unicodedata.category(c)[0] in "LN")


def character_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over characters / reference characters (spaces and punctuation
    ignored): the measure for languages whose words are not space separated, and for Korean."""
    ref, hyp = _normalize_chars(reference), _normalize_chars(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, rc in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, hc in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rc != hc))
    return round(row[-1] / max(1, len(ref)), 4)


def reference_text(ref: Path) -> str:
    """The reference's words in order: a .json of turns (make_conversation.py) or plain text."""
    if ref.suffix == ".json":
        turns = json.loads(ref.read_text())["turns"]
        return " ".join(t["text"] for t in sorted(turns, key=lambda t: t["start"]))
    return ref.read_text()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", help="comma-separated subset of: sample,conv2,conv3,jfk,stereo,korean")
    ap.add_argument(
        "--extra", type=Path, action="append", default=[], help="a folder of make_conversation.py calls (repeatable)"
    )
    ap.add_argument("--heldout", type=Path, help="make the HELDOUT calls in this folder (once), and score them")
    a = ap.parse_args()
    if not (SHARED / "tools" / "score.py").exists():
        print(json.dumps({"skipped": f"../shared/tools/score.py is absent ({SHARED})"}))
        return 0
    if a.heldout and make_heldout(a.heldout):
        a.extra.append(a.heldout)
    from ecg_audio.logs import configure_logging
    from ecg_cli.runner import analyze
    from worker.models import get_registry

    configure_logging("WARNING", json_output=False)
    registry = get_registry()
    registry.preload()  # model loading is not part of any file's figures
    totals: dict[str, Any] = {"files": 0, "audio_s": 0.0, "wall_s": 0.0, "stage_s": {}}
    rows = []
    with tempfile.TemporaryDirectory(prefix="ecg-quality-") as tmp_s:
        tmp = Path(tmp_s)
        files = eval_set(tmp)
        wanted = a.files.split(",") if a.files is not None else list(files)
        wanted = [w for w in wanted if w]
        for wav in sorted(w for folder in a.extra for w in folder.glob("*.wav")):
            ref, rttm = wav.with_suffix(".json"), wav.with_suffix(".rttm")
            if ref.exists() and rttm.exists():
                files[wav.stem] = {"wav": wav, "ref": ref, "rttm": rttm}
                wanted.append(wav.stem)
        for name in wanted:
            f = files[name]
            t0 = time.perf_counter()
            env = analyze(str(f["wav"]), registry=registry)
            wall = time.perf_counter() - t0
            env.pop("exports", None)
            out = tmp / f"{name}.json"
            out.write_text(json.dumps(env))
            s = score(out, f["ref"], f["rttm"])
            md = env["result"]["metadata"]
            speakers = md["speakers_detected"]
            cer = None
            if md.get("language") in CER_LANGUAGES:
                # score.py counts ASCII words only: for these languages characters are scored here
                hyp = " ".join(seg["text"] for seg in env["result"]["segments"])
                cer = character_error_rate(reference_text(f["ref"]), hyp)
                s = {**s, "wer": None, "cpwer": None}
            if f.get("unlabelled"):
                s = {**s, "der": None, "speakers_ref": None}
            row = {
                "file": name,
                "duration_s": md["duration"],
                "language": md.get("language"),
                "asr_model": md.get("models", {}).get("asr"),
                "wer": s.get("wer"),
                "cer": cer,
                "der": s.get("der"),
                "cpwer": s.get("cpwer"),
                "speakers_ref": s.get("speakers_ref", f.get("speakers")),
                "speakers_found": speakers,
                "cpwer_minus_wer": None if s.get("cpwer") is None else round(s["cpwer"] - s["wer"], 4),
                "wall_s": round(wall, 2),
                "stage_s": md["stage_times"],
            }
            if f.get("speakers") is not None:
                row["speakers_ok"] = speakers == f["speakers"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            totals["files"] += 1
            totals["audio_s"] += md["duration"]
            totals["wall_s"] += wall
            for k, v in md["stage_times"].items():
                totals["stage_s"][k] = round(totals["stage_s"].get(k, 0.0) + v, 3)
    worded = [r for r in rows if r["wer"] is not None]
    scored = [r for r in rows if r["der"] is not None and r["speakers_ref"] and r["speakers_ref"] >= 2]
    totals.update(
        {
            "audio_s": round(totals["audio_s"], 1),
            "wall_s": round(totals["wall_s"], 1),
            "mean_wer": round(sum(r["wer"] for r in worded) / max(1, len(worded)), 4),
            "cer": {r["file"]: r["cer"] for r in rows if r["cer"] is not None},
            "mean_der": round(sum(r["der"] for r in scored) / max(1, len(scored)), 4) if scored else None,
            "max_cpwer_minus_wer": max((r["cpwer_minus_wer"] for r in scored), default=None),
            "speakers_found": {r["file"]: r["speakers_found"] for r in rows},
        }
    )
    print(json.dumps({"totals": totals}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
