#!/usr/bin/env python3
"""Build-time warm-up for Dockerfile.gpu: what a worker would otherwise do at its first start.

1. ONNX export of the embedded diarization models (segmentation-3.0, CAM++) into
   ``--onnx-dir`` (the image's ``ECG_ONNX_CACHE_DIR``). Files are named by a digest of
   the weights and the torch version, so the worker finds them and exports nothing.
   Only the embedded pipeline on the CPU uses them (a CUDA worker runs torch); a
   CPU-only worker from this image still starts without the export (~10 s on 2 cores).
2. librosa's numba functions compiled into ``--numba-dir`` (the image's
   ``NUMBA_CACHE_DIR``): the features warm-up then takes ~0.5 s instead of ~20 s.

Prints one JSON line of what it wrote; exits 1 if an expected artifact is missing.

usage: infra/prepare_image.py --onnx-dir DIR --numba-dir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx-dir", type=Path, required=True)
    ap.add_argument("--numba-dir", type=Path, required=True)
    ap.add_argument(
        "--diarization", default=os.environ.get("ECG_DIARIZATION_MODEL", "embedded"), help="the image's model"
    )
    a = ap.parse_args(argv)
    # numba reads its cache location when it is imported: set it before anything imports librosa
    os.environ["NUMBA_CACHE_DIR"] = str(a.numba_dir)
    a.numba_dir.mkdir(parents=True, exist_ok=True)
    a.onnx_dir.mkdir(parents=True, exist_ok=True)

    from ecg_audio.settings import offline_model_env

    offline_model_env()
    out: dict[str, object] = {}
    t0 = time.perf_counter()
    if a.diarization == "embedded":
        from pipeline.diarize import load_diarization_pipeline

        load_diarization_pipeline("embedded", device="cpu", runtime="onnxruntime", onnx_cache_dir=a.onnx_dir)
        out["onnx_files"] = sorted(p.name for p in a.onnx_dir.glob("*.onnx"))
    else:
        out["onnx_files"] = []
        out["onnx_skipped"] = f"diarization model {a.diarization!r} runs in torch"
    out["onnx_s"] = round(time.perf_counter() - t0, 1)

    from pipeline.features import warm_up

    out["numba_warm_up_s"] = round(warm_up(), 1)
    out["numba_cache_files"] = sum(1 for p in a.numba_dir.rglob("*") if p.is_file())
    print(json.dumps(out))
    if a.diarization == "embedded" and len(out["onnx_files"]) < 2:  # type: ignore[arg-type]
        print("the ONNX export did not write both models", file=sys.stderr)
        return 1
    if not out["numba_cache_files"]:
        print("numba wrote no cache", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
