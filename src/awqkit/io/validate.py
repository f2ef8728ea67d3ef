"""Checks :func:`awqkit.io.load.load_quantized` runs before any checkpoint tensor reaches the model.

Every failure is an :class:`~awqkit.errors.AwqkitError` with a one-line message naming the file or tensor,
what is wrong and the fix (``docs/errors.md``, section "Loading"):

* :func:`read_tensors`: the safetensors files (one file or an index and its shards). A file whose header is
  garbage, whose header length points past the end, or whose data is cut short is a
  :class:`~awqkit.errors.CheckpointError` naming the file (never a raw ``SafetensorError``).
* :func:`int_setting`, :func:`check_bits_group`, :func:`name_list`: the quantization config's settings are of the
  right types and supported (bits 2..8, group size positive or -1); :mod:`awqkit.io.ct_config` uses them for
  compressed-tensors config groups.
* :func:`check_config_fields` / :func:`check_config_against_tensors`: ``config.json`` states the size fields
  the architecture needs as positive integers (transformers would silently fill absent ones with its
  defaults and build a model of another size), and agrees with the tensors on the number of decoder
  layers and the embedding's ``[vocab_size, hidden_size]`` -- checked before the model is built.
* :func:`check_tensors`: every tensor against the model built from the config, whatever the backend:
  GEMM ``qweight`` int32 ``[in, out/8]``, ``qzeros`` int32 ``[in/g, out/8]``, ``scales`` fp16/bf16/fp32
  ``[in/g, out]``; compressed-tensors ``weight_packed`` int32 ``[out, ceil(in*bits/32)]`` (or the older
  padded width), ``weight_zero_point`` int32, ``weight_scale`` float ``[out, in/g]``, ``weight_shape`` int
  ``[2] == [out, in]``; biases and every other float tensor a float dtype with the module's shape; and no
  NaN/Inf in any float tensor (scales, biases, embeddings, norms, LM head): a
  :class:`~awqkit.errors.NonFiniteError` naming the tensor and its file.

All of it is one pass over tensors already in memory (``isfinite`` on fp16 data is cheap next to reading it).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from awqkit.arch import spec_for_architectures
from awqkit.errors import CheckpointError, NonFiniteError
from awqkit.nn.qlinear import QuantLinear

#: dtypes of non-quantized float tensors (cast to the model dtype on load).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: dtypes of quantization scales the kernels read (cpu-avx2 only fp16; other layers fall back).
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DEFAULT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EMBED_RE = re.compile(r"(?:^|\.)embed_tokens\.weight$")
_FIX = "re-save the checkpoint (or download it again)"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _load_file(file: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError, OverflowError, MemoryError) as exc:
        raise CheckpointError(f"weight file {file} is damaged or cut short ({_one_line(exc)}); {_FIX}") from None


def _shard_names(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index} is not a readable shard index ({_one_line(exc)}); {_FIX}") from None
    bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or not n]
    if bad:
        raise CheckpointError(f"{index} names shards that are not file names in its folder: {bad[:5]}; {_FIX}")
    return names


def check_index(path: Path) -> list[str] | None:
    """The shard names ``path/model.safetensors.index.json`` lists (None without an index); every shard must
    be there. Raises CheckpointError for an unreadable index or a missing shard."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return None
    files = _shard_names(index)
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path} lacks the weight shard(s) {missing} listed in its index; {_FIX}")
    return files


def safetensors_keys(file: Path) -> list[str]:
    """The tensor names in ``file``'s header. ``safe_open`` reads only the header and checks that it covers
    the file exactly, so a garbage or cut-short file is a CheckpointError naming it, before any data is read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as fh:
            return list(fh.keys())
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"weight file {file} is damaged or cut short ({_one_line(exc)}); {_FIX}") from None


def read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor of the checkpoint folder ``path`` and ``{tensor name: file name}``.

    Raises:
        CheckpointError: no weights, an unreadable index, a missing shard, a damaged or truncated file, or a
            tensor stored in two shards.
    """
    files = check_index(path)
    if files is None and (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif files is None:
        raise CheckpointError(
            f"{path} has neither model.safetensors nor model.safetensors.index.json; pass the "
            "folder that holds the weights, or save the checkpoint again"
        )
    tensors: dict[str, Tensor] = {}
    where: dict[str, str] = {}
    for fname in files:
        for key, t in _load_file(path / fname).items():
            if key in where:
                raise CheckpointError(f"tensor {key} is stored in both {where[key]} and {fname} of {path}; {_FIX}")
            tensors[key], where[key] = t, fname
    return tensors, where


_PACKED_SUFFIXES = (".qweight", ".qzeros", ".weight_packed", ".g_idx", ".weight_zero_point")


def check_float_weights(folder: Path, suggested: str | None = None) -> None:
    """A folder about to load as a float model: its safetensors headers are readable and hold no packed
    quantized tensors (which transformers would skip, leaving those layers randomly initialized).

    ``suggested``: the method the folder's metadata or name suggests, named in the message.
    """
    for file in sorted(folder.glob("*.safetensors")):
        keys = safetensors_keys(file)
        packed = next((k for k in keys if k.endswith(_PACKED_SUFFIXES)), None)
        if packed is not None:
            hint = f" (its metadata or name suggests {suggested!r})" if suggested else ""
            raise CheckpointError(
                f"{folder} holds packed quantized tensors ({packed} in {file.name}) but no "
                f"quantization config{hint}; restore the quantization_config in its config.json "
                "(or its quantize_config.json) from the original checkpoint"
            )


def _text_config(raw: dict[str, Any]) -> dict[str, Any]:
    text = raw.get("text_config")
    return text if isinstance(text, dict) else raw


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_config_fields(path: Path, raw: dict[str, Any], config: Any = None) -> None:
    """``config.json`` names a ``model_type`` and states the size fields as positive integers.

    The fields are the architecture's :attr:`~awqkit.arch.specs.ArchSpec.config_fields` when awqkit knows it;
    otherwise those of :data:`_DEFAULT_FIELDS` the file states, plus (once ``config``, the built transformers
    config, is given) those the config class has but the file lacks.
    """

    file = path / "config.json"
    if not isinstance(raw.get("model_type"), str) or not raw.get("model_type"):
        raise CheckpointError(
            f"{file} lacks model_type (or it is not a string); restore the config.json the checkpoint was saved with"
        )
    text = _text_config(raw)
    archs = raw.get("architectures")
    names = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    spec = spec_for_architectures(names)
    if spec is not None:
        fields = list(spec.config_fields)
    else:
        fields = [f for f in _DEFAULT_FIELDS if f in text]
        if config is not None:
            text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
            fields += [f for f in _DEFAULT_FIELDS if f not in text and hasattr(text_cfg, f)]
    bad = [f for f in fields if not _positive_int(text.get(f))]
    if bad:
        raise CheckpointError(
            f"{file} lacks the size fields {bad} (or they are not positive integers); "
            "transformers would fill defaults and build a model of another size than the "
            "weights: restore the config.json the checkpoint was saved with"
        )


def check_config_against_tensors(path: Path, raw: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """The config's ``num_hidden_layers`` and ``[vocab_size, hidden_size]`` match the stored tensors (so a
    wrong config fails here, before a model of the wrong size is built)."""
    text = _text_config(raw)
    file = path / "config.json"
    layers = {int(m.group(1)) for k in tensors if (m := _LAYER_RE.search(k))}
    n_layers = text.get("num_hidden_layers")
    if layers and _positive_int(n_layers) and n_layers != max(layers) + 1:
        raise CheckpointError(
            f"{file} says num_hidden_layers={n_layers} but the weights hold {max(layers) + 1} "
            "decoder layers; restore the config.json the checkpoint was saved with"
        )
    for key, t in tensors.items():
        if _EMBED_RE.search(key) and t.dim() == 2:
            want = (text.get("vocab_size"), text.get("hidden_size"))
            if all(_positive_int(v) for v in want) and tuple(t.shape) != want:
                raise CheckpointError(
                    f"{file} says vocab_size={want[0]}, hidden_size={want[1]} but {key} is "
                    f"{list(t.shape)}; restore the config.json the checkpoint was saved with"
                )


def int_setting(path: Path, raw: dict[str, Any], names: tuple[str, ...], default: int | None) -> int:
    """The first of ``names`` in quantization config ``raw`` as an int (``default`` when none is there)."""
    for name in names:
        if name in raw:
            value = raw[name]
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise CheckpointError(
                f"{path}: quantization_config {name}={value!r} must be an integer; restore the "
                "config the checkpoint was saved with"
            )
    if default is None:
        raise CheckpointError(
            f"{path}: quantization_config lacks {names[0]}; restore the config the checkpoint was saved with"
        )
    return default


def check_bits_group(path: Path, bits: int, group_size: int) -> None:
    """``bits`` in 2..8 and ``group_size`` positive or -1."""
    if not 2 <= bits <= 8:
        raise CheckpointError(f"{path}: quantization_config bits={bits} is not supported; awqkit loads 2..8 bits")
    if group_size != -1 and group_size < 1:
        raise CheckpointError(f"{path}: quantization_config group_size={group_size} must be positive or -1")


def name_list(path: Path, raw: dict[str, Any], key: str) -> list[str]:
    """``raw[key]`` as a list of module names (absent or null: empty)."""
    value = raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"{path}: quantization_config {key}={value!r} must be a list of module names")
    return list(value)


def _expected_quant(module: Any, leaf: str) -> tuple[tuple[torch.dtype, ...] | None, list[tuple[int, ...]], str]:
    """(allowed dtypes or None = any integer dtype, allowed shapes, description) of a QuantLinear tensor."""
    n, k, bits = module.out_features, module.in_features, module.bits
    shape = tuple(getattr(module, leaf).shape) if getattr(module, leaf, None) is not None else None
    i32 = (torch.int32,)
    table: dict[str, tuple[tuple[torch.dtype, ...] | None, str]]
    if module.format == "gemm":
        table = {
            "qweight": (i32, "int32 [in, out/8] (AutoAWQ GEMM)"),
            "qzeros": (i32, "int32 [in/group, out/8] (AutoAWQ GEMM)"),
            "scales": (SCALE_DTYPES, "fp16/bf16/fp32 [in/group, out]"),
        }
    else:
        table = {
            "weight_packed": (i32, "int32 [out, ceil(in*bits/32)] (compressed-tensors)"),
            "weight_zero_point": (i32, "int32 [ceil(out*bits/32), in/group] (compressed-tensors)"),
            "weight_scale": (SCALE_DTYPES, "fp16/bf16/fp32 [out, in/group]"),
            "weight_shape": (None, "an integer [2] tensor equal to [out, in]"),
        }
    table["bias"] = (FLOAT_DTYPES[:3], "fp16/bf16/fp32 [out]")
    dtypes, what = table.get(leaf, (None, "?"))
    shapes = [shape] if shape is not None else []
    if leaf in ("weight_packed", "weight_zero_point") and shape is not None:  # older padded layout
        padded = math.ceil((k if leaf == "weight_packed" else n) / (32 // bits))
        shapes.append((n, padded) if leaf == "weight_packed" else (padded, shape[1]))
    return dtypes, shapes, what


def _count_nonfinite(t: Tensor) -> int:
    """NaN/Inf values in ``t`` (0 for integer tensors). Fast path: ``aminmax`` (one reduction, no mask;
    NaN propagates through min/max, +-Inf lands on an end), the mask only for the count of a bad tensor."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    lo, hi = torch.aminmax(t)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return 0
    return int((~torch.isfinite(t)).sum())


def check_tensors(
    model: nn.Module, tensors: dict[str, Tensor], where: dict[str, str], path: Path, qc: dict[str, Any]
) -> None:
    """Every tensor of ``tensors`` against ``model`` (built from the config, QuantLinears installed, still on
    the meta device): dtype, shape, and finiteness of float tensors. Keys the model lacks are left to the
    missing / unexpected keys check.

    Raises:
        CheckpointError: a wrong dtype or shape (the message names the tensor, its file, what was expected).
        NonFiniteError: a float tensor holding NaN or Inf.
    """

    modules = dict(model.named_modules(remove_duplicate=False))
    expected: dict[str, Tensor] = dict(model.named_buffers(remove_duplicate=False))
    expected.update(model.named_parameters(remove_duplicate=False))
    for key, t in tensors.items():
        exp = expected.get(key)
        if exp is None:
            continue
        mod_name, _, leaf = key.rpartition(".")
        module = modules.get(mod_name)
        at = f"checkpoint {path}: tensor {key} ({where.get(key, '?')})"
        if isinstance(module, QuantLinear):
            group_hint = f" (is group_size={module.group_size} in quantization_config right? bits={module.bits})"
            dtypes, shapes, what = _expected_quant(module, leaf)
            ok_dtype = (
                dtypes is None and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
            ) or (dtypes is not None and t.dtype in dtypes)
            if not ok_dtype:
                raise CheckpointError(
                    f"{at} is {str(t.dtype).removeprefix('torch.')}, expected {what}; {_FIX} "
                    "with awqkit or the tool that wrote it"
                )
            if tuple(t.shape) not in shapes:
                raise CheckpointError(
                    f"{at} has shape {list(t.shape)}, but the {module.in_features}->"
                    f"{module.out_features} linear built from config.json expects "
                    f"{list(shapes[0])}{group_hint}"
                )
            if leaf == "weight_shape" and t.tolist() != [module.out_features, module.in_features]:
                raise CheckpointError(
                    f"{at} holds {t.tolist()}, but the linear built from config.json is "
                    f"[{module.out_features}, {module.in_features}]{group_hint}"
                )
        else:
            want_float = exp.is_floating_point()
            if (t.dtype not in FLOAT_DTYPES) if want_float else (t.is_floating_point() or t.is_complex()):
                kind = "a float dtype (fp16, bf16, fp32)" if want_float else f"an integer dtype like {exp.dtype}"
                raise CheckpointError(f"{at} is {str(t.dtype).removeprefix('torch.')}, expected {kind}; {_FIX}")
            if t.shape != exp.shape:
                raise CheckpointError(
                    f"{at} has shape {list(t.shape)}, but the {type(model).__name__} built from "
                    f"config.json expects {list(exp.shape)}; does config.json belong to these "
                    "weights?"
                )
        bad = _count_nonfinite(t)
        if bad:
            raise NonFiniteError(
                f"{at} holds {bad} NaN/Inf value(s); the checkpoint is damaged: re-save it from "
                "a finite model (or download it again)"
            )


__all__ = [
    "FLOAT_DTYPES",
    "SCALE_DTYPES",
    "check_bits_group",
    "check_config_against_tensors",
    "check_config_fields",
    "check_float_weights",
    "check_tensors",
    "int_setting",
    "name_list",
    "read_tensors",
]
