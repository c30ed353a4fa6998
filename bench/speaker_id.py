"""Speakers by name: the threshold calibrated on voices not used for tuning, and the matching's cost.

Voices: ``../shared/tools/make_conversation.py``'s six espeak-ng voices, split in two: voices
0-2 tune the threshold, voices 3-5 evaluate it (and the conversations of each side use other
seeds too). For each side, a 3-voice conversation per enrollment seed gives each voice's
enrollment sample (20 s of that voice alone, through ``voice_of_sample`` as ``POST /speakers``
does); two of the three voices are enrolled, the third is the stranger. Then each test
conversation (other seeds, the same three voices) is diarized, and its speakers matched.

Reported, per side:

* ``genuine`` / ``impostor``: cosine similarities of (speaker label, enrolled voice) pairs,
  where the label's main reference voice is / is not the enrolled one;
* ``false_reject`` / ``false_accept``: their share below / at or above the threshold;
* ``named_right``: share of the enrolled voices' speech time (reference turns) whose diarized
  speaker carries their name; ``stranger_named``: share of the stranger's speech time that
  carries any name.

The threshold: on the tuning side, the midpoint between the highest impostor and the lowest
genuine similarity (or, when they overlap, the value with the fewest errors); ``--threshold``
evaluates a given one. ``--matching FILE`` also times the matching on a recording (default
``conv_2spk_10min.wav``): diarize once, then identify speakers against 50 enrolled voices.

    python -m bench.speaker_id [--tune-seeds 1 2] [--eval-seeds 11 12] [--minutes 2]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import SHARED, emit, loadavg

VOICE_SPLIT = {"tune": [0, 1, 2], "eval": [3, 4, 5]}


def _maker() -> Any:
    path = SHARED / "tools" / "make_conversation.py"
    if not path.is_file():
        print(f"bench: {path} is absent", file=sys.stderr)
        raise SystemExit(2)
    spec = importlib.util.spec_from_file_location("make_conversation", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def conversation(
    out: Path, name: str, voices: list[int], seed: int, minutes: float
) -> tuple[Path, list[dict[str, Any]]]:
    """A conversation of the chosen voices (speakers named V<voice>) and its reference turns."""
    import json

    maker = _maker()
    all_voices, all_pitch = list(maker.VOICES), list(maker.PITCH)
    maker.VOICES = [all_voices[v] for v in voices]
    maker.PITCH = [all_pitch[v] for v in voices]
    argv = sys.argv
    sys.argv = ["make_conversation", str(out), name, "--minutes", str(minutes), "--speakers", str(len(voices))]
    sys.argv += ["--seed", str(seed)]
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the bench's one JSON line
            maker.main()
    finally:
        sys.argv = argv
    turns = json.loads((out / f"{name}.json").read_text())["turns"]
    for t in turns:
        t["speaker"] = f"V{voices[int(t['speaker'][1:])]}"
    return out / f"{name}.wav", turns


def own_speech(audio: np.ndarray, turns: list[dict[str, Any]], voice: str, seconds: float) -> np.ndarray:
    """``seconds`` of one voice alone: its turns that overlap no other, end to end."""
    parts, total = [], 0.0
    for t in turns:
        clash = any(u is not t and u["start"] < t["end"] and t["start"] < u["end"] for u in turns)
        if t["speaker"] != voice or clash:
            continue
        parts.append(audio[int(t["start"] * 16000) : int(t["end"] * 16000)])
        total += t["end"] - t["start"]
        if total >= seconds:
            break
    return np.concatenate(parts)[: int(seconds * 16000)]


def label_voices(diar: Any, turns: list[dict[str, Any]]) -> dict[str, str]:
    """Each diarized label's main reference voice (by overlapping time)."""
    overlap: dict[str, dict[str, float]] = {}
    for h in diar.exclusive_turns:
        for r in turns:
            ov = min(h.end, r["end"]) - max(h.start, r["start"])
            if ov > 0:
                overlap.setdefault(h.speaker, {}).setdefault(r["speaker"], 0.0)
                overlap[h.speaker][r["speaker"]] += ov
    return {label: max(v, key=lambda k: v[k]) for label, v in overlap.items()}


def named_time(diar: Any, names: dict[str, str], turns: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """For each reference voice: its speech time, and how much of it carries each name."""
    out: dict[str, dict[str, float]] = {}
    for r in turns:
        entry = out.setdefault(r["speaker"], {"_total": 0.0})
        entry["_total"] += r["end"] - r["start"]
        for h in diar.exclusive_turns:
            ov = min(h.end, r["end"]) - max(h.start, r["start"])
            if ov > 0 and h.speaker in names:
                entry[names[h.speaker]] = entry.get(names[h.speaker], 0.0) + ov
    return out


def run_side(pipe: Any, side: str, seeds: list[int], enroll_seed: int, minutes: float, tmp: Path) -> dict[str, Any]:
    from pipeline.audio import load_wav
    from pipeline.diarize import diarize
    from pipeline.voiceprints import Voiceprint, unit, voice_of_sample

    voices = VOICE_SPLIT[side]
    wav, turns = conversation(tmp, f"{side}-enroll-{enroll_seed}", voices, enroll_seed, minutes)
    audio = load_wav(wav)
    enrolled = [f"V{v}" for v in voices[:2]]
    prints = [Voiceprint(v, v, voice_of_sample(pipe, own_speech(audio, turns, v, 20.0)).vector) for v in enrolled]
    pairs: list[tuple[float, bool]] = []
    tests = []
    for seed in seeds:
        wav, turns = conversation(tmp, f"{side}-{seed}", voices, seed, minutes)
        diar = diarize(pipe, load_wav(wav))
        truth = label_voices(diar, turns)
        for label, vector in diar.voiceprints.items():
            for p in prints:
                score = float(unit(vector) @ unit(p.vector))  # type: ignore[operator]
                pairs.append((score, truth.get(label) == p.name))
        tests.append((diar, turns))
    return {"voices": voices, "enrolled": enrolled, "pairs": pairs, "tests": tests, "prints": prints}


def choose_threshold(pairs: list[tuple[float, bool]]) -> float:
    genuine = sorted(s for s, g in pairs if g)
    impostor = sorted(s for s, g in pairs if not g)
    if genuine and impostor and impostor[-1] < genuine[0]:
        return round((impostor[-1] + genuine[0]) / 2, 3)
    candidates = sorted({s for s, _ in pairs})
    errors = [(sum(g != (s >= c) for s, g in pairs), c) for c in candidates]
    return round(min(errors)[1], 3)


def evaluate(side: dict[str, Any], threshold: float) -> dict[str, Any]:
    from pipeline.voiceprints import match_speakers

    genuine = [s for s, g in side["pairs"] if g]
    impostor = [s for s, g in side["pairs"] if not g]
    right = total = stranger = stranger_total = 0.0
    for diar, turns in side["tests"]:
        matches = match_speakers(diar.voiceprints, side["prints"], threshold)
        names = {label: m.name for label, m in matches.items()}
        for voice, entry in named_time(diar, names, turns).items():
            if voice in side["enrolled"]:
                right += entry.get(voice, 0.0)
                total += entry["_total"]
            else:
                stranger += sum(v for k, v in entry.items() if k != "_total")
                stranger_total += entry["_total"]
    return {
        "voices": side["voices"],
        "genuine": [round(s, 3) for s in sorted(genuine)],
        "impostor": [round(s, 3) for s in sorted(impostor)],
        "false_reject": round(sum(s < threshold for s in genuine) / max(1, len(genuine)), 4),
        "false_accept": round(sum(s >= threshold for s in impostor) / max(1, len(impostor)), 4),
        "named_right": round(right / max(total, 1e-9), 4),
        "stranger_named": round(stranger / max(stranger_total, 1e-9), 4),
        "enrolled_speech_s": round(total, 1),
        "stranger_speech_s": round(stranger_total, 1),
    }


def time_matching(pipe: Any, wav: Path) -> dict[str, Any]:
    """Diarize once, then time what matching adds: the assignment over 50 enrolled voices and
    naming the result (the voiceprints come with the diarization at no extra model pass)."""
    from pipeline.audio import load_wav
    from pipeline.diarize import diarize
    from pipeline.voiceprints import FixedSpeakers, Voiceprint, identify_speakers

    t0 = time.perf_counter()
    diar = diarize(pipe, load_wav(wav))
    diarize_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prints = [Voiceprint(f"r{i}", f"stranger {i}", list(rng.normal(size=192))) for i in range(48)]
    prints += [Voiceprint(label, f"host {label}", v) for label, v in diar.voiceprints.items()]
    words = [{"word": "w", "start": 0.0, "end": 0.1, "speaker": "SPEAKER_00"}] * 20
    result = {"segments": [{"speaker": f"SPEAKER_0{i % 2}", "words": words} for i in range(1000)], "metadata": {}}
    t0 = time.perf_counter()
    identify_speakers(result, diar, FixedSpeakers(prints), "bench", {})
    return {
        "file": wav.name,
        "diarize_s": round(diarize_s, 2),
        "matching_s": round(time.perf_counter() - t0, 4),
        "named": result["metadata"].get("speakers"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tune-seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--eval-seeds", type=int, nargs="+", default=[11, 12])
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--threshold", type=float, help="evaluate this threshold instead of tuning one")
    ap.add_argument("--matching", default=str(SHARED / "audio" / "conv_2spk_10min.wav"), help="'' to skip")
    a = ap.parse_args()

    from ecg_audio.settings import get_settings, offline_model_env

    offline_model_env()
    from worker.models import get_registry

    pipe, _ = get_registry(get_settings()).diarization()
    before = loadavg()
    with tempfile.TemporaryDirectory(prefix="speaker-id-") as tmp:
        tune = run_side(pipe, "tune", a.tune_seeds, 101, a.minutes, Path(tmp))
        chosen = choose_threshold(tune["pairs"])
        threshold = a.threshold if a.threshold is not None else chosen
        held = run_side(pipe, "eval", a.eval_seeds, 111, a.minutes, Path(tmp))
        out: dict[str, Any] = {
            "bench": "speaker_id",
            "threshold": threshold,
            "tuned_threshold": chosen,
            "tune": {"seeds": a.tune_seeds, **evaluate(tune, threshold)},
            "eval": {"seeds": a.eval_seeds, **evaluate(held, threshold)},
        }
    if a.matching and Path(a.matching).is_file():
        out["matching"] = time_matching(pipe, Path(a.matching))
    emit(out, before, loadavg())


if __name__ == "__main__":
    main()
