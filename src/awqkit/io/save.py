"""Write a quantized model as a Hugging Face checkpoint folder, atomically.

Layout of ``dst``:

* ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``:
  the state dict. :class:`QuantLinear` modules contribute their packed buffers (``qweight``/``qzeros``/
  ``scales``[/``bias``] in the AutoAWQ GEMM format (4 bits), ``weight_packed``/``weight_scale``
  [/``weight_zero_point``]/``weight_shape``[/``bias``] in the compressed-tensors pack-quantized format, any width
  and mixed widths: :attr:`QuantConfig.output_format <awqkit.config.QuantConfig>`); every
  other float tensor (embeddings, norms, LM head, float linears) is stored in fp16. A tied output embedding is
  stored once (only the input embedding; :mod:`awqkit.io.state`). Shards are planned by huggingface_hub, as
  transformers plans them, and written by :class:`awqkit.io.shards.ShardWriter`, which the streaming engine
  (:mod:`awqkit.io.stream`) uses too.
* ``config.json``: the model config with ``dtype``/``torch_dtype`` ``"float16"`` and a
  ``quantization_config`` matching the modules' format (AutoAWQ ``awq``/``gemm``, or compressed-tensors
  ``pack-quantized``).
* tokenizer files, chat templates, ``generation_config.json`` copied from ``src_dir``.
* ``quantization_metadata.json``: the caller's metadata (sorted keys, indent 2).

Everything is written to a hidden sibling ``.<name>.tmp-XXXX`` and put in ``dst``'s place only when
complete, through :mod:`awqkit.io.destination` (which ``dst`` may be replaced, the journaled replacement, and
the recovery of what a killed run left). ``quantization_metadata.json`` records each weight file's size and
sha256 under ``"files"`` (:data:`FILES_KEY`), so a reader can tell a complete output from a damaged one
(:func:`verify_files`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from awqkit.arch.names import name_matches
from awqkit.config import QuantConfig
from awqkit.errors import DestinationError, InputError
from awqkit.files import sha256_file
from awqkit.io import destination
from awqkit.io.state import state_plan, write_shards
from awqkit.nn import hf
from awqkit.nn.qlinear import QuantLinear

logger = logging.getLogger(__name__)

FILES_KEY = "files"  # quantization_metadata.json: {file name: {"bytes": int, "sha256": str}} of the weights
SRC_FILE_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.tiktoken",
    "spiece.model",
    "chat_template*",
    "*.jinja",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "training_metadata.json",
)
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like ``"2GB"`` (10^9), ``"500MiB"`` (2^20), ``"1000"`` (not
    huggingface_hub's ``parse_size_to_int``, which reads no ``B``, ``KiB``..``TiB`` or bare number)."""
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE_RE.match(str(size))
        if not m:
            raise ValueError(f"max_shard_size={size!r} is not a size; use e.g. '2GB', '500MB' or bytes as int")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r} must be positive")
    return value


def build_quantization_config(
    quant_config: QuantConfig,
    ignore: list[str],
    format: str | None = None,
    quantized: Sequence[str] = (),
) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json``: AutoAWQ for layout ``format="gemm"``, compressed-tensors
    for ``"pack-quantized"`` (default: ``quant_config.layout``).

    compressed-tensors: one ``config_groups`` entry per bit width of the ``quantized`` linears (full names, each
    ``quant_config.bits_for`` its name). One width: ``group_0`` targets the class ``Linear`` (the float linears
    are in ``ignore``). Mixed widths: ``group_0`` is ``quant_config.bits``' (if any linear has it), the others
    follow in increasing width, and each group's ``targets`` list its linears' exact names. Exact names are
    compressed-tensors' first-priority match and never regexes or class names that could also catch another
    group's linears or a module vLLM fuses (its ``qkv_proj`` is a ``Linear`` too)."""
    format = format or quant_config.layout
    if format == "gemm":
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": quant_config.group_size,
            "zero_point": quant_config.zero_point,
            "version": quant_config.version,
            "modules_to_not_convert": list(ignore),
        }
    by_bits: dict[int, list[str]] = {}
    for name in quantized:
        by_bits.setdefault(quant_config.bits_for(name), []).append(name)
    widths = sorted(by_bits, key=lambda b: (b != quant_config.bits, b)) or [quant_config.bits]
    groups = {
        f"group_{i}": {
            "targets": ["Linear"] if len(widths) == 1 else sorted(by_bits[bits]),
            "weights": _ct_weights(quant_config, bits),
            "input_activations": None,
            "output_activations": None,
        }
        for i, bits in enumerate(widths)
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": groups,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "quantization_status": "compressed",
        "awqkit": True,
    }


def _ct_weights(quant_config: QuantConfig, bits: int) -> dict[str, Any]:
    """A compressed-tensors config group's ``weights`` (``QuantizationArgs``) for ``bits``-wide integers."""
    channel = quant_config.group_size == -1
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": not quant_config.zero_point,
        "strategy": "channel" if channel else "group",
        "group_size": None if channel else quant_config.group_size,
        "dynamic": False,
        "actorder": None,
    }


def _ignore_list(model: nn.Module, given: list[str], quantized: set[str]) -> list[str]:
    """``given`` plus every float ``nn.Linear`` not matched by it (loaders must skip them all)."""
    out = list(given)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(name_matches(name, p) for p in given):
            out.append(name)
    for entry in out:
        if not entry.startswith("re:"):
            clash = next((q for q in quantized if entry in q), None)
            if clash is not None:
                logger.warning(
                    "modules_to_not_convert entry %r is a substring of quantized module %r; loaders that "
                    "match by substring (transformers, vLLM) would skip it. Use a more specific name.",
                    entry,
                    clash,
                )
    return out


def file_digest(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex digest}`` of ``path``."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def verify_files(folder: str | Path, metadata: dict[str, Any], *, hashes: bool = True) -> str | None:
    """Why ``folder``'s weight files differ from what ``metadata[FILES_KEY]`` recorded at the end of their
    write (missing, another size, another sha256 when ``hashes``), or None when they all match.

    Metadata written before awqkit recorded files has no such entry: that is reported too."""
    files = metadata.get(FILES_KEY)
    if not isinstance(files, dict) or not files:
        return "its quantization_metadata.json records no weight files (written by an older awqkit)"
    folder = Path(folder)
    for name, want in sorted(files.items()):
        path = folder / name
        if not isinstance(want, dict) or not path.is_file():
            return f"weight file {name} is missing"
        size = path.stat().st_size
        if size != want.get("bytes"):
            return f"weight file {name} has {size} bytes, {want.get('bytes')} were written"
        if hashes and file_digest(path)["sha256"] != want.get("sha256"):
            return f"weight file {name} changed since it was written (sha256 differs)"
    return None


def _config_dict(model: nn.Module, qcfg: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads(hf.config(model).to_json_string(use_diff=True))
    for sub in cfg.values():
        if isinstance(sub, dict):
            sub.pop("quantization_config", None)
    cfg["dtype"] = "float16"
    cfg["torch_dtype"] = "float16"
    if not cfg.get("architectures"):
        cfg["architectures"] = [type(model).__name__]
    cfg["quantization_config"] = qcfg
    return cfg


def _copy_src_files(src_dir: Path, folder: Path) -> list[str]:
    if not src_dir.is_dir():
        raise ValueError(f"src_dir={src_dir} is not a directory; pass the original model folder or None")
    copied = []
    for pattern in SRC_FILE_PATTERNS:
        for path in sorted(src_dir.glob(pattern)):
            if path.is_file() and not (folder / path.name).exists():
                shutil.copy2(path, folder / path.name)
                copied.append(path.name)
    return copied


def quantized_config(model: nn.Module, quant_config: QuantConfig, modules_to_not_convert: list[str]) -> dict[str, Any]:
    """``config.json`` of the quantized ``model`` (its QuantLinear modules may be on the meta device): its
    config with the ``quantization_config`` of the modules' layout. ValueError when nothing is quantized or the
    modules disagree with ``quant_config`` (one checkpoint holds one group size, zero point and layout; each linear
    has the width ``quant_config.bits_for`` its name)."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quantized:
        raise InputError("model has no QuantLinear modules; quantize it (nn.replace.replace_linears) before saving")
    for name, m in quantized.items():
        expected = (quant_config.bits_for(name), quant_config.group_size, quant_config.zero_point)
        if (m.bits, m.group_size, m.zero_point) != expected:
            raise InputError(
                f"{name} was quantized with bits={m.bits}, group_size={m.group_size}, zero_point={m.zero_point} "
                f"but quant_config says bits={expected[0]}, group_size={quant_config.group_size}, "
                f"zero_point={quant_config.zero_point}; one checkpoint holds one setting"
            )
    formats = {m.format for m in quantized.values()}
    if len(formats) != 1:
        raise InputError(f"quantized linears mix layouts {sorted(formats)}; one checkpoint holds one layout")
    ignore = _ignore_list(model, list(modules_to_not_convert), set(quantized))
    return _config_dict(model, build_quantization_config(quant_config, ignore, formats.pop(), list(quantized)))


def write_side_files(
    model: nn.Module,
    folder: Path,
    *,
    src_dir: str | Path | None,
    config: dict[str, Any],
    metadata: dict[str, Any],
    weight_files: list[str],
) -> None:
    """Everything of an output folder but the weights: ``config.json``, the source's tokenizer / chat-template /
    generation files (or the model's generation config), and ``quantization_metadata.json`` recording each of
    ``weight_files``' size and sha256 (:data:`FILES_KEY`)."""
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copied = _copy_src_files(Path(src_dir), folder) if src_dir is not None else []
    gen = getattr(model, "generation_config", None)
    if "generation_config.json" not in copied and gen is not None:
        gen.to_json_file(folder / "generation_config.json", use_diff=True)
    files = {name: file_digest(folder / name) for name in weight_files}
    (folder / "quantization_metadata.json").write_text(meta_text(metadata, files))


def writing_errors(dst: Path) -> contextlib.AbstractContextManager[None]:
    """Turn an OSError while writing the output into a DestinationError that says nothing was replaced."""
    return _WritingErrors(dst)


class _WritingErrors(contextlib.AbstractContextManager):
    def __init__(self, dst: Path) -> None:
        self.dst = dst

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if isinstance(exc, OSError) and not isinstance(exc, FileExistsError):
            raise DestinationError(
                f"writing the output to {self.dst} failed ({exc.strerror or exc}"
                f"{': ' + str(exc.filename) if exc.filename else ''}); nothing was replaced. "
                "Free disk space or fix permissions, then run again"
            ) from exc


def save_quantized(
    model: nn.Module,
    dst: str | Path,
    *,
    src_dir: str | Path | None,
    quant_config: QuantConfig,
    metadata: dict[str, Any],
    modules_to_not_convert: list[str],
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Save ``model`` (with :class:`QuantLinear` modules in place) to ``dst``; returns ``dst``.

    Args:
        model: a transformers causal LM whose quantized linears were replaced (``replace_linears``).
        dst: output folder; must not exist unless ``overwrite`` (then it is replaced only once the new
            folder is complete).
        src_dir: original model folder to copy tokenizer/chat-template/generation files from, or None.
        quant_config: the settings the QuantLinear modules were built with (checked against them).
        metadata: JSON-serializable dict written to ``quantization_metadata.json``.
        modules_to_not_convert: names/patterns kept in float; every other float ``nn.Linear`` is added.
        max_shard_size: bytes per safetensors shard (``"2GB"``, ``"500MB"``, int bytes).
        extra_files: called with the temporary folder before it is renamed into place, to add files
            (e.g. ``AWQResults.save``) that must be part of the atomic write.
    Raises:
        DestinationError (a FileExistsError): ``dst`` exists and ``overwrite`` is False, or it may not be
            replaced (:func:`awqkit.io.destination.check_destination`); writing failed (disk full, ...).
        ValueError: nothing quantized, modules disagree with ``quant_config``, metadata not JSON,
            broken tied embeddings, or a value that overflows fp16.
    """
    dst = destination.check_destination(dst, overwrite=overwrite, src=src_dir)
    max_bytes = parse_size(max_shard_size)
    meta_text(metadata, {})  # not JSON: fail before writing anything
    config = quantized_config(model, quant_config, modules_to_not_convert)
    plan = state_plan(model)

    destination.recover(dst)
    with writing_errors(dst), destination.staging(dst) as tmp:
        written = write_shards(plan, tmp, max_bytes)
        write_side_files(model, tmp, src_dir=src_dir, config=config, metadata=metadata, weight_files=written)
        if extra_files is not None:
            extra_files(tmp)
        normal_permissions(tmp)
        destination.commit(tmp, dst)
    logger.info(
        "saved %d quantized linears (%d-bit) to %s",
        sum(isinstance(m, QuantLinear) for m in model.modules()),
        quant_config.bits,
        dst,
    )
    return dst


def meta_text(metadata: dict[str, Any], files: dict[str, Any]) -> str:
    """``quantization_metadata.json``'s text: ``metadata`` with the written weight files under :data:`FILES_KEY`."""
    try:
        return json.dumps({**metadata, FILES_KEY: files}, sort_keys=True, indent=2) + "\n"
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"metadata is not JSON-serializable ({exc}); convert values to str/int/float/list/dict"
        ) from None


def normal_permissions(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give the result the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


__all__ = ["FILES_KEY", "build_quantization_config", "file_digest", "parse_size", "save_quantized", "verify_files"]
