"""Load the float model to quantize: a local Hugging Face folder, a ``.gguf`` file, or a hub id.

* folder: safetensors, or ``pytorch_model*.bin`` read with ``weights_only=True`` (transformers' default);
* ``.gguf`` file: transformers' GGUF reader (needs the ``gguf`` package) dequantizes it to float32;
* anything else is passed to transformers as a hub id (needs a network connection or the hub cache).

``trust_remote_code`` is False unless asked for. The model lands on CPU in its stored dtype (or
``dtype``); awqkit computes each layer in float32 whatever the stored dtype.

:func:`inspect_source` checks a source before anything heavy is loaded, each problem a one-line
:mod:`awqkit.errors` error: a missing local path (also one that only looks like a hub id, such as
``models/my-model`` when ``models/`` exists here), a hub id the hub does not know or cannot be asked about,
a folder without ``config.json`` or weights, an already quantized model, an architecture awqkit does not
support, a config without the size fields the architecture needs, and weight files whose safetensors header
is damaged or whose data is cut short (``safe_open`` checks that the header covers the file exactly).
:func:`check_finite` names the first tensor of a loaded model holding NaN or Inf.
"""

from __future__ import annotations

import json
import logging
import os
import pickle  # only for its UnpicklingError: weights are read with weights_only=True
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from awqkit.arch import spec_for_architectures, supported_architectures
from awqkit.errors import CheckpointError, InputError, NonFiniteError
from awqkit.files import sha256_named_files
from awqkit.io import validate

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
        return {
            "src": self.src,
            "kind": self.kind,
            "architectures": self.architectures,
            "weights_sha256": self.weights_sha256,
            "name_or_path": self.name_or_path,
        }


def _weight_files(folder: Path) -> list[Path]:
    return [p for pat in WEIGHT_PATTERNS[:2] for p in folder.glob(pat)]


@dataclass
class SourceCheck:
    """What :func:`inspect_source` found: where to load from and the raw ``config.json`` (None for hub ids
    not in the local cache and for GGUF files)."""

    src: str
    kind: str  # "folder", "gguf" or "hub"
    folder: Path | None
    load_dir: str
    extra: dict[str, Any]
    files: list[Path]
    config: dict[str, Any] | None

    def text_config(self) -> dict[str, Any]:
        """The language model's part of the config (``text_config`` of multimodal configs)."""
        cfg = self.config or {}
        text = cfg.get("text_config")
        return text if isinstance(text, dict) else cfg


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc}); restore the model's config.json") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(
            f"{path} holds a {type(cfg).__name__}, not a JSON object; restore the model's config.json"
        )
    return cfg


def _check_config(src: str, cfg: dict[str, Any]) -> None:

    qc = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    if qc:
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
        raise InputError(
            f"{src} is already quantized (quant_method {method!r} in config.json); pass the float "
            "model it was made from"
        )
    names = cfg.get("architectures") or []
    spec = spec_for_architectures(names)
    if spec is None and names:  # without architectures the model class decides, once it is built
        raise InputError(
            f"{src}: architecture {names or cfg.get('model_type')!r} is not supported; supported: "
            f"{', '.join(supported_architectures())}"
        )
    validate.check_config_fields(Path(src), cfg)


def _local_prefix_exists(src: str) -> Path | None:
    """The first component of ``src`` when it is a local folder (``models`` of ``models/my-model``)."""
    first = Path(src).parts[0] if Path(src).parts else ""
    return Path(first) if first and Path(first).is_dir() else None


def _check_hub_id(src: str) -> None:
    """A hub id must be in the local hub cache or known to the hub (one quick request, no retries)."""
    local = _local_prefix_exists(src)
    if local is not None:
        raise InputError(
            f"model source {src!r} does not exist (the folder {local}/ does, so this looks like a "
            "mistyped local path); check the path, or prefix a hub id's owner with nothing local"
        )
    try:
        from huggingface_hub import HfApi, try_to_load_from_cache
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return
    if isinstance(try_to_load_from_cache(src, "config.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise InputError(
            f"model source {src!r} is not a local path, and HF_HUB_OFFLINE is set with no cached copy; "
            "pass a local folder or a .gguf file"
        )
    try:
        HfApi().model_info(src, timeout=10)
    except RepositoryNotFoundError:
        raise InputError(
            f"model source {src!r} is neither a local path nor a model on the Hugging Face hub; check the spelling"
        ) from None
    except Exception as exc:  # noqa: BLE001 - the hub client's transport errors (httpx, httpx2, requests) share no
        # base class below Exception; any failure here means the hub could not be asked
        if getattr(getattr(exc, "response", None), "status_code", None) in (401, 403):
            return  # gated or private: transformers will use the user's token
        raise InputError(
            f"model source {src!r} is not a local path, and the Hugging Face hub could not be asked "
            f"about it ({type(exc).__name__}: {str(exc)[:120]}); pass a local folder, or check the "
            "network"
        ) from None


def inspect_source(src: str | Path) -> SourceCheck:
    """Check ``src`` before loading it (see the module docstring); raises InputError / CheckpointError."""
    path = Path(src).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return SourceCheck(str(src), "gguf", path.parent, str(path.parent), {"gguf_file": path.name}, [path], None)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise InputError(f"{path} has no config.json; expected a Hugging Face model folder or a .gguf file")
        cfg = _read_config(cfg_file)
        _check_config(str(src), cfg)
        files = _weight_files(path)
        if not files:
            raise InputError(f"{path} holds no *.safetensors or pytorch_model*.bin weights")
        validate.check_index(path)
        for f in files:
            if f.suffix == ".safetensors":
                validate.safetensors_keys(f)
        return SourceCheck(str(src), "folder", path, str(path), {}, files, cfg)
    if path.exists():
        raise InputError(f"{path} is a file but not a .gguf; pass its folder (with config.json) instead")
    if str(src).count("/") == 1 and not str(src).startswith((".", "/", "~")):
        _check_hub_id(str(src))
        return SourceCheck(str(src), "hub", None, str(src), {}, [], None)
    raise InputError(f"model source {str(src)!r} does not exist; pass a local folder, a .gguf file or a hub id")


def check_finite_tensors(tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Raise NonFiniteError naming the first float tensor of ``tensors`` (name, tensor) holding NaN or Inf."""
    for name, t in tensors:
        if not t.is_floating_point() or t.numel() == 0 or t.is_meta:
            continue
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(
                f"{where}: tensor {name} holds {bad} NaN/Inf value(s); fix or re-export the model "
                "(awqkit cannot quantize or keep non-finite weights)"
            )


def check_finite(model: torch.nn.Module, where: str) -> None:
    """:func:`check_finite_tensors` over ``model``'s parameters and buffers (tied ones once)."""
    unique = {id(t): (n, t) for n, t in reversed([*model.named_parameters(), *model.named_buffers()])}
    check_finite_tensors(reversed(list(unique.values())), where)


def load_source(
    src: str | Path,
    *,
    dtype: torch.dtype | str = "auto",
    trust_remote_code: bool = False,
    hash_files: bool = True,
    checked: SourceCheck | None = None,
) -> tuple[Any, Any, SourceInfo]:
    """Return ``(model, tokenizer, SourceInfo)`` for ``src`` (see module docstring), model in eval mode on CPU.

    ``checked``: :func:`inspect_source`'s result when the caller ran it already.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chk = checked or inspect_source(src)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    logger.info("loading %s model from %s", chk.kind, src)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            chk.load_dir, dtype=dtype, low_cpu_mem_usage=True, **chk.extra, **common
        )
        tokenizer = AutoTokenizer.from_pretrained(chk.load_dir, **chk.extra, **common)
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        # transformers', safetensors' and torch.load's errors for files that are not what they claim
        raise CheckpointError(
            f"loading {src} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
            "check that it is a complete Hugging Face causal LM"
        ) from exc
    if chk.kind == "gguf":  # the GGUF reader returns a plain float model tagged as "gguf-quantized"
        # plain attributes: nn.Module.__setattr__ is typed for tensors and modules only
        model.hf_quantizer = None  # type: ignore[assignment]
        model.is_quantized = False  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if getattr(model.config, "quantization_config", None) is not None:
        raise InputError(f"{src} is already quantized ({model.config.quantization_config}); pass a float model")
    model.eval()
    info = SourceInfo(
        src=str(src),
        kind=chk.kind,
        folder=chk.folder,
        architectures=list(getattr(model.config, "architectures", None) or [type(model).__name__]),
        weights_sha256=sha256_named_files(chk.files) if (hash_files and chk.files) else None,
        name_or_path=str(getattr(model.config, "_name_or_path", "") or src),
    )
    return model, tokenizer, info
