"""Which quantization method produced a checkpoint folder, with its bits and group size.

This module is the one place that reads how a folder is quantized: :func:`awqkit.io.load.read_quant_config`
(the loader), :mod:`awqkit.eval.runner_load` (``awqkit eval``) and :func:`awqkit.platform.info.describe_folder`
(``awqkit info``) all take the method from here, so they cannot disagree about a folder.

Sources, checked in this order:

1. The *storage* config, found by :func:`find_quant_config`: ``config.json["quantization_config"]`` (or the
   same key in its ``text_config``), else a separate ``quantization_config.json``, AutoAWQ's
   ``quant_config.json`` or AutoGPTQ's ``quantize_config.json`` (first found). Its ``quant_method`` gives
   the storage format (``awq``, ``gptq``, ``compressed-tensors``, ``bitsandbytes``, ``fp8``, ...); without
   ``quant_method`` a config with ``w_bit``/``q_group_size`` is AWQ, one with ``desc_act``/``damp_percent``/
   ``sym`` GPTQ, one with only ``version`` AWQ (:func:`side_config_method`), anything else ``unknown``.
   Bits / group size come from ``bits``/``w_bit`` and ``group_size``/``q_group_size``, or for compressed-tensors from
   the first config group's ``weights`` (``num_bits``; ``group_size`` for the ``group`` strategy, -1 for ``channel``,
   None otherwise). bitsandbytes gives 4 or 8 bits.
2. ``quantization_metadata.json`` (written by awqkit): its ``method`` (e.g. ``rtn`` vs ``awq``, which the
   AutoAWQ-style ``quantization_config`` cannot tell apart), ``bits`` and ``group_size``. With a storage
   config in a format awqkit writes (:data:`LOADABLE_FORMATS`), the method comes from the metadata, bits and
   group size from the storage config (the metadata fills what it lacks), and ``source`` names both
   (``"quantization_metadata.json+config.json"``). With a storage config in another format (``gptq``, ...)
   the metadata is stale (awqkit never writes that format) and is ignored with a warning: the weights are
   stored as the config says. Without a storage config the metadata alone gives the method.
3. The folder name: a method token (letters/digits after the start or a ``_``/``-``/``.``) followed by
   ``_w<bits>`` (optionally ``a<act bits>``) and ``_g<group>``, case-insensitive, e.g.
   ``Qwen3-0.6B-..._AWQ_w4_g128_headfp16_quantized`` or ``..._RTN_w3_g64``.
4. Otherwise ``fp`` (bits from the config's dtype when it names one: 16 or 32; group size None).

``method`` is always lowercase; ``format`` is the storage config's method, None when no file holds one
(then the folder is not a quantized checkpoint, whatever its metadata or name suggest).
:func:`load_refusal` says why the loader refuses a detection (None when it reads the format).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from awqkit.errors import CheckpointError

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"(?:^|[_.\-])([a-z][a-z0-9]*)[_\-]w(\d+)(?:a\d+)?[_\-]g(-?\d+)(?=$|[_.\-])", re.IGNORECASE)
_SIDE_FILES = ("quantization_config.json", "quant_config.json", "quantize_config.json")
#: Storage formats (a quantization config's ``quant_method``) that :func:`awqkit.io.load.load_quantized` reads.
LOADABLE_FORMATS = ("awq", "compressed-tensors")
_DTYPE_BITS = {"float16": 16, "bfloat16": 16, "float32": 32, "float": 32, "half": 16}


@dataclass(frozen=True)
class QuantizationInfo:
    """Detected quantization of a checkpoint folder.

    method: lowercase method (``awq``, ``rtn``, ``gptq``, ``compressed-tensors``, ``bitsandbytes``, ``fp``, ...).
    bits: weight bits, or None when unknown. group_size: channels per scale, -1 per row, None unknown.
    source: where it was found (``config.json``, ``quantization_metadata.json``,
    ``quantization_metadata.json+config.json``, a side file's name, ``folder name``, or ``none``).
    format: the storage format named by a quantization config (its ``quant_method``), if any.
    """

    method: str
    bits: int | None
    group_size: int | None
    source: str
    format: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields."""
        return asdict(self)


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise CheckpointError(f"{file} cannot be read ({exc.strerror or exc}); check its permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{file} is not valid JSON ({' '.join(str(exc).split())}); fix or remove the file, "
            "or restore it from the original checkpoint"
        ) from None


def read_config_json(folder: str | Path) -> dict[str, Any] | None:
    """``folder/config.json`` as a dict, None when the file is absent.

    Raises:
        CheckpointError: the file is not valid JSON, or holds something other than a JSON object.
    """
    file = Path(folder) / "config.json"
    if not file.is_file():
        return None
    data = _read_json(file)
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{file} holds a {type(data).__name__}, not a JSON object; restore the config.json "
            "the checkpoint was saved with"
        )
    return data


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None or isinstance(value, bool) else int(value)
    except (TypeError, ValueError):
        return None


def _ct_settings(qc: dict[str, Any]) -> tuple[int | None, int | None]:
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict):
        return None, None
    groups = {k: g for k, g in groups.items() if isinstance(g, dict)}
    if not groups:
        return None, None
    chosen = next(
        (g for g in groups.values() if isinstance(g.get("targets"), (list, str)) and "Linear" in g["targets"]), None
    )
    chosen = chosen or next(iter(groups.values()))
    if len(groups) > 1:
        logger.info("compressed-tensors config has %d groups; reporting the one targeting Linear", len(groups))
    weights = chosen.get("weights") if isinstance(chosen.get("weights"), dict) else {}
    strategy = weights.get("strategy")
    if strategy == "channel":
        group_size: int | None = -1
    elif strategy == "group" or strategy is None:
        group_size = _int_or_none(weights.get("group_size"))
    else:
        group_size = None
    return _int_or_none(weights.get("num_bits")), group_size


def side_config_method(qc: dict[str, Any]) -> str | None:
    """The method of a quantization config without ``quant_method`` (AutoAWQ's ``quant_config.json``,
    AutoGPTQ's ``quantize_config.json``): ``"awq"`` for AutoAWQ's own keys (``w_bit``, ``q_group_size``),
    ``"gptq"`` for AutoGPTQ's (``desc_act``, ``damp_percent``, ``sym``), ``"awq"`` for a bare ``version``
    (AutoAWQ's GEMM/GEMV), else None. GPTQ's keys win over ``version``, which some GPTQ writers also store."""
    if "w_bit" in qc or "q_group_size" in qc:
        return "awq"
    if {"desc_act", "damp_percent", "sym"} & set(qc):
        return "gptq"
    if "version" in qc:
        return "awq"
    return None


@dataclass(frozen=True)
class QuantConfigFile:
    """The storage config of a folder (:func:`find_quant_config`).

    raw: the ``quantization_config``-like dict. source: where it was found (``config.json``, a side file's
    name). method: its lowercase ``quant_method`` (:func:`side_config_method` when absent, else ``unknown``).
    """

    raw: dict[str, Any]
    source: str
    method: str


def config_method(qc: dict[str, Any]) -> str:
    """The lowercase storage method of a ``quantization_config``-like dict (module docstring, 1)."""
    method = qc.get("quant_method")
    if method is None:
        method = side_config_method(qc)
    return str(method or "unknown").strip().lower()


def find_quant_config(folder: str | Path, config: dict[str, Any] | None = None) -> QuantConfigFile | None:
    """The storage config of ``folder`` (module docstring, 1), or None when no file holds one.

    ``config``: the folder's ``config.json`` dict when the caller has already read it.

    Raises:
        CheckpointError: ``config.json`` is not a JSON object, or its ``quantization_config`` is not an object.
    """
    folder = Path(folder)
    if config is None:
        config = read_config_json(folder) or {}
    for holder in (config, config.get("text_config")):
        if not isinstance(holder, dict) or holder.get("quantization_config") is None:
            continue
        qc = holder["quantization_config"]
        if not isinstance(qc, dict):
            raise CheckpointError(
                f"{folder / 'config.json'}: quantization_config is a {type(qc).__name__}, not an "
                "object; restore the config.json the checkpoint was saved with"
            )
        return QuantConfigFile(qc, "config.json", config_method(qc))
    for name in _SIDE_FILES:
        if (folder / name).is_file():
            side = _read_json(folder / name)
            if isinstance(side, dict):
                return QuantConfigFile(side, name, config_method(side))
            logger.warning("%s holds a %s, not a JSON object; ignoring it", folder / name, type(side).__name__)
    return None


def is_quantized_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a storage quantization config (:func:`find_quant_config`: ``config.json``'s or its
    ``text_config``'s ``quantization_config``, else a side file). A malformed ``config.json`` counts as not
    quantized here; loading the folder reports what is wrong with it."""
    try:
        return find_quant_config(folder) is not None
    except CheckpointError:
        return False


def _from_quant_config(found: QuantConfigFile) -> QuantizationInfo:
    """Read a storage config (see the module docstring, 1)."""
    qc, method = found.raw, found.method
    if method == "compressed-tensors":
        bits, group_size = _ct_settings(qc)
    elif method == "bitsandbytes":
        bits = 4 if qc.get("load_in_4bit") else 8 if qc.get("load_in_8bit") else None
        group_size = _int_or_none(qc.get("bnb_4bit_blocksize")) if bits == 4 else None
    elif method == "fp8":
        bits, group_size = 8, None
    else:
        bits = _int_or_none(qc.get("bits", qc.get("w_bit")))
        group_size = _int_or_none(qc.get("group_size", qc.get("q_group_size")))
    return QuantizationInfo(method, bits, group_size, found.source, format=method)


def _merge_metadata(meta: dict[str, Any], base: QuantizationInfo | None) -> QuantizationInfo | None:
    method = meta.get("method")
    if not isinstance(method, str) or not method:
        return None
    bits = _int_or_none(meta.get("bits"))
    group_size = _int_or_none(meta.get("group_size"))
    if base is None:
        return QuantizationInfo(method.lower(), bits, group_size, "quantization_metadata.json")
    for name, meta_v, cfg_v in (("bits", bits, base.bits), ("group_size", group_size, base.group_size)):
        if meta_v is not None and cfg_v is not None and meta_v != cfg_v:
            logger.warning(
                "quantization_metadata.json says %s=%s but config.json says %s; using config.json", name, meta_v, cfg_v
            )
    return QuantizationInfo(
        method.lower(),
        base.bits if base.bits is not None else bits,
        base.group_size if base.group_size is not None else group_size,
        f"quantization_metadata.json+{base.source}",
        format=base.format,
    )


def _from_name(name: str) -> QuantizationInfo | None:
    m = _NAME_RE.search(name)
    if m is None:
        return None
    return QuantizationInfo(m.group(1).lower(), int(m.group(2)), int(m.group(3)), "folder name")


def inspect_folder(path: str | Path) -> tuple[QuantizationInfo, QuantConfigFile | None]:
    """:func:`detect_quantization_method`'s answer and the storage config it read (None when none).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        NotADirectoryError: ``path`` is a file, not a checkpoint folder.
        CheckpointError: one of the JSON files read is not valid JSON, or ``config.json`` (or its
            ``quantization_config``) is not a JSON object.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist; pass the folder holding config.json")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; pass the checkpoint folder that holds it")
    config = read_config_json(folder) or {}
    found = find_quant_config(folder, config)
    info = _from_quant_config(found) if found is not None else None

    meta_file = folder / "quantization_metadata.json"
    if meta_file.is_file():
        meta = _read_json(meta_file)
        if info is not None and info.format not in LOADABLE_FORMATS:
            logger.warning(
                "%s: %s stores the weights as %r, which awqkit never writes; ignoring the stale %s",
                folder,
                info.source,
                info.format,
                meta_file.name,
            )
        else:
            merged = _merge_metadata(meta, info) if isinstance(meta, dict) else None
            if merged is None:
                logger.warning("%s has no 'method' string; ignoring it", meta_file)
            else:
                info = merged
    if info is None:
        info = _from_name(folder.resolve().name)
    if info is None:
        dtype = config.get("dtype", config.get("torch_dtype"))
        info = QuantizationInfo("fp", _DTYPE_BITS.get(str(dtype)), None, "none")
    logger.debug("detected %s for %s", info, folder)
    return info, found


def detect_quantization_method(path: str | Path) -> QuantizationInfo:
    """Detect how the checkpoint folder ``path`` was quantized (order of sources in the module docstring).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        NotADirectoryError: ``path`` is a file, not a checkpoint folder.
        CheckpointError (a ValueError): one of the JSON files read is not valid JSON, or ``config.json`` is
            not a JSON object.
    """
    return inspect_folder(path)[0]


def load_refusal(info: QuantizationInfo, folder: str | Path) -> str | None:
    """Why :func:`awqkit.io.load.load_quantized` refuses a folder detected as ``info`` (one line naming the
    method, where it was found and what to do), or None when the loader reads its storage format."""
    if info.format is None:
        hint = (
            ""
            if info.method == "fp"
            else (f" (its {info.source} suggests {info.method!r}, but no file says how the weights are stored)")
        )
        return (
            f"{folder} has no quantization config (config.json quantization_config, quantization_config.json, "
            f"quant_config.json or quantize_config.json){hint}; it is not a quantized checkpoint: load it as a "
            "float model (transformers, or `awqkit eval`, which loads float folders)"
        )
    if info.format not in LOADABLE_FORMATS:
        unknown = info.format == "unknown"
        fix = (
            "restore the quant_method the checkpoint was written with"
            if unknown
            else f"load this one with the library that reads {info.format!r}, or quantize the float model with awqkit"
        )
        return (
            f"{folder}: quant_method={info.format!r} is not supported (found in {info.source}"
            f"{', which names no quant_method' if unknown else ''}); awqkit loads 'awq' (GEMM) and "
            f"'compressed-tensors' (pack-quantized) checkpoints: {fix}"
        )
    return None


def describe_loader(info: QuantizationInfo, folder: str | Path) -> str:
    """What awqkit's loaders do with a folder detected as ``info`` (the ``loading`` line of ``awqkit info``)."""
    refusal = load_refusal(info, folder)
    if refusal is None:
        return f"load_quantized reads it ({info.format} storage)"
    if info.format is None:
        return "not a quantized checkpoint: load_quantized refuses it, `awqkit eval` loads it as a float model"
    return f"refused by load_quantized and `awqkit eval`: quant_method {info.format!r} is not supported"


__all__ = [
    "LOADABLE_FORMATS",
    "QuantConfigFile",
    "QuantizationInfo",
    "config_method",
    "describe_loader",
    "detect_quantization_method",
    "find_quant_config",
    "inspect_folder",
    "load_refusal",
    "read_config_json",
    "side_config_method",
]
