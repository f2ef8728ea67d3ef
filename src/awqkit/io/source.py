"""Load the float model to quantize: a local Hugging Face folder, a ``.gguf`` file, or a hub id.

* folder: safetensors, or ``pytorch_model*.bin`` read with ``weights_only=True`` (transformers' default);
* ``.gguf`` file: transformers' GGUF reader (needs the ``gguf`` package) dequantizes it to float32;
* anything else is passed to transformers as a hub id (needs a network connection).

``trust_remote_code`` is False unless asked for. The model lands on CPU in its stored dtype (or
``dtype``); awqkit computes each layer in float32 whatever the stored dtype.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")


@dataclass
class SourceInfo:
    """Where a model came from, for metadata."""

    src: str
    kind: str  # "folder", "gguf" or "hub"
    folder: Path | None  # a local folder holding tokenizer/config files, when there is one
    architectures: list[str] = field(default_factory=list)
    weights_sha256: str | None = None
    name_or_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"src": self.src, "kind": self.kind, "architectures": self.architectures,
                "weights_sha256": self.weights_sha256, "name_or_path": self.name_or_path}


def hash_weights(paths: list[Path], chunk: int = 1 << 22) -> str:
    """sha256 over the named weight files (sorted by name; name and content both hashed)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda x: x.name):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    return [p for pat in WEIGHT_PATTERNS[:2] for p in folder.glob(pat)]


def load_source(
    src: str | Path,
    *,
    dtype: torch.dtype | str = "auto",
    trust_remote_code: bool = False,
    hash_files: bool = True,
) -> tuple[Any, Any, SourceInfo]:
    """Return ``(model, tokenizer, SourceInfo)`` for ``src`` (see module docstring), model in eval mode on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(src).expanduser()
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if path.is_file() and path.suffix == ".gguf":
        kind, folder, load_dir, extra = "gguf", path.parent, str(path.parent), {"gguf_file": path.name}
        files = [path]
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json; expected a Hugging Face model folder or a .gguf file")
        files = _weight_files(path)
        if not files:
            raise ValueError(f"{path} holds no *.safetensors or pytorch_model*.bin weights")
        kind, folder, load_dir, extra = "folder", path, str(path), {}
    elif path.exists():
        raise ValueError(f"{path} is a file but not a .gguf; pass its folder (with config.json) instead")
    elif str(src).count("/") == 1 and not str(src).startswith((".", "/", "~")):
        kind, folder, load_dir, extra, files = "hub", None, str(src), {}, []
    else:
        raise ValueError(f"model source {str(src)!r} does not exist; pass a local folder, a .gguf file or a hub id")

    logger.info("loading %s model from %s", kind, src)
    model = AutoModelForCausalLM.from_pretrained(load_dir, dtype=dtype, low_cpu_mem_usage=True, **extra, **common)
    tokenizer = AutoTokenizer.from_pretrained(load_dir, **extra, **common)
    if kind == "gguf":  # the GGUF reader returns a plain float model tagged as "gguf-quantized"
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if getattr(model.config, "quantization_config", None) is not None:
        raise ValueError(f"{src} is already quantized ({model.config.quantization_config}); pass a float model")
    model.eval()
    info = SourceInfo(
        src=str(src), kind=kind, folder=folder,
        architectures=list(getattr(model.config, "architectures", None) or [type(model).__name__]),
        weights_sha256=hash_weights(files) if (hash_files and files) else None,
        name_or_path=str(getattr(model.config, "_name_or_path", "") or src),
    )
    return model, tokenizer, info
