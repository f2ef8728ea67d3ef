"""Which quantization method produced a checkpoint folder, with its bits and group size.

Sources, checked in this order (the first that says anything about quantization wins, except that
awqkit's metadata refines the method, see 2):

1. ``config.json["quantization_config"]`` (or the same key in its ``text_config``): ``quant_method``
   gives the storage format (``awq``, ``gptq``, ``compressed-tensors``, ``bitsandbytes``, ``fp8``, ...);
   bits / group size come from ``bits``/``w_bit`` and ``group_size``/``q_group_size``, or for
   compressed-tensors from the first config group's ``weights`` (``num_bits``; ``group_size`` for the
   ``group`` strategy, -1 for ``channel``, None otherwise). bitsandbytes gives 4 or 8 bits.
2. ``quantization_metadata.json`` (written by awqkit): its ``method`` (e.g. ``rtn`` vs ``awq``, which the
   AutoAWQ-style ``quantization_config`` cannot tell apart), ``bits`` and ``group_size``. When
   ``config.json`` also has a ``quantization_config``, the method comes from the metadata, bits and
   group size from the config (the metadata fills what the config lacks), and ``source`` names both
   (``"quantization_metadata.json+config.json"``).
3. A separate ``quantization_config.json``, or AutoAWQ's ``quant_config.json`` / AutoGPTQ's
   ``quantize_config.json``: read as in 1; without ``quant_method`` a file with ``w_bit``/``version``
   is taken as AWQ and one with ``desc_act``/``damp_percent``/``sym`` as GPTQ.
4. The folder name: a method token (letters/digits after the start or a ``_``/``-``/``.``) followed by
   ``_w<bits>`` (optionally ``a<act bits>``) and ``_g<group>``, case-insensitive, e.g.
   ``Qwen3-0.6B-..._AWQ_w4_g128_headfp16_quantized`` or ``..._RTN_w3_g64``.
5. Otherwise ``fp`` (bits from the config's dtype when it names one: 16 or 32; group size None).

``method`` is always lowercase.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(
    r"(?:^|[_.\-])([a-z][a-z0-9]*)[_\-]w(\d+)(?:a\d+)?[_\-]g(-?\d+)(?=$|[_.\-])", re.IGNORECASE
)
_SIDE_FILES = ("quantization_config.json", "quant_config.json", "quantize_config.json")
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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON ({exc}); fix or remove the file") from None


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None or isinstance(value, bool) else int(value)
    except (TypeError, ValueError):
        return None


def _ct_settings(qc: dict[str, Any]) -> tuple[int | None, int | None]:
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        return None, None
    chosen = next((g for g in groups.values() if "Linear" in (g.get("targets") or [])), None)
    chosen = chosen or next(iter(groups.values()))
    if len(groups) > 1:
        logger.info("compressed-tensors config has %d groups; reporting the one targeting Linear", len(groups))
    weights = chosen.get("weights") or {}
    strategy = weights.get("strategy")
    if strategy == "channel":
        group_size: int | None = -1
    elif strategy == "group" or strategy is None:
        group_size = _int_or_none(weights.get("group_size"))
    else:
        group_size = None
    return _int_or_none(weights.get("num_bits")), group_size


def side_config_method(qc: dict[str, Any]) -> str | None:
    """The method of a side config file without ``quant_method`` (``quant_config.json`` /
    ``quantize_config.json``): ``"awq"`` for AutoAWQ's keys (``w_bit``, ``version``), ``"gptq"`` for
    AutoGPTQ's (``desc_act``, ``damp_percent``, ``sym``), else None."""
    if "w_bit" in qc or "version" in qc:
        return "awq"
    if {"desc_act", "damp_percent", "sym"} & set(qc):
        return "gptq"
    return None


def _from_quant_config(qc: dict[str, Any], source: str, side_file: bool = False) -> QuantizationInfo:
    """Read a ``quantization_config``-like dict (see the module docstring, 1 and 3)."""
    method = qc.get("quant_method")
    if method is None and side_file:
        method = side_config_method(qc)
    method = str(method or "unknown").lower()
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
    return QuantizationInfo(method, bits, group_size, source, format=method)


def _config_quant(config: dict[str, Any]) -> dict[str, Any] | None:
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        text = config.get("text_config")
        qc = text.get("quantization_config") if isinstance(text, dict) else None
    return qc if isinstance(qc, dict) else None


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
            logger.warning("quantization_metadata.json says %s=%s but config.json says %s; using config.json",
                           name, meta_v, cfg_v)
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


def detect_quantization_method(path: str | Path) -> QuantizationInfo:
    """Detect how the checkpoint folder ``path`` was quantized (order of sources in the module docstring).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        NotADirectoryError: ``path`` is a file, not a checkpoint folder.
        ValueError: one of the JSON files read is not valid JSON.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist; pass the folder holding config.json")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; pass the checkpoint folder that holds it")
    config: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        loaded = _read_json(folder / "config.json")
        config = loaded if isinstance(loaded, dict) else {}
    qc = _config_quant(config)
    info = _from_quant_config(qc, "config.json") if qc is not None else None

    meta_file = folder / "quantization_metadata.json"
    if meta_file.is_file():
        meta = _read_json(meta_file)
        merged = _merge_metadata(meta, info) if isinstance(meta, dict) else None
        if merged is None:
            logger.warning("%s has no 'method' string; ignoring it", meta_file)
        else:
            info = merged
    if info is None:
        for name in _SIDE_FILES:
            if (folder / name).is_file():
                side = _read_json(folder / name)
                if isinstance(side, dict):
                    info = _from_quant_config(side, name, side_file=True)
                    break
    if info is None:
        info = _from_name(folder.resolve().name)
    if info is None:
        dtype = config.get("dtype", config.get("torch_dtype"))
        info = QuantizationInfo("fp", _DTYPE_BITS.get(str(dtype)), None, "none")
    logger.debug("detected %s for %s", info, folder)
    return info


__all__ = ["QuantizationInfo", "detect_quantization_method"]
