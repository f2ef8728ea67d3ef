"""Run names: ``{base_model}-{dataset}_{method}_{peft}_{quant_tag}``; quantized folders add ``_quantized``.

Example: ``Qwen3-0.6B-openmath_SFT_NoPeft_AWQ_w4_g128_headfp16`` (folder
``Qwen3-0.6B-openmath_SFT_NoPeft_AWQ_w4_g128_headfp16_quantized``).

Characters each part may hold (checked by :func:`make_run_name`, so every name it makes parses back):

* ``base_model``: letters, digits, ``.`` and ``-`` (``Qwen3-0.6B``, ``Meta-Llama-3.1-8B-Instruct``);
  no ``_``, no ``/`` (pass ``Qwen3-0.6B``, not ``Qwen/Qwen3-0.6B``; :func:`base_model_name` strips it).
* ``dataset``: letters, digits and ``.``; no ``-`` (the last ``-`` before the first ``_`` ends the base
  model) and no ``_``.
* ``method`` (training method, e.g. ``SFT``, ``DPO``) and ``peft`` (``NoPeft``, ``LoRA``, ``LoRA-r16``):
  letters, digits, ``.`` and ``-``; no ``_``.
* ``quant_tag`` (optional; may itself hold ``_``): tokens of letters, digits, ``.`` and ``-`` joined by
  ``_``, the first a method (a letter, then letters/digits; not a ``w<bits>`` / ``g<group>`` token), the
  last not ``quantized``. The canonical
  tags made by :func:`quant_tag` are ``FP16`` / ``FP32`` (float) or ``<METHOD>_w<bits>_g<group>[_sym][_head<dtype>]``,
  e.g. ``AWQ_w4_g128_headfp16``, ``RTN_w3_g64``, ``RTN_w4_g-1`` (one group per row).

Every part starts and ends with a letter or digit. :func:`parse_run_name` splits at the first ``_``
(``{base_model}-{dataset}`` / the rest), the base model from the dataset at the last ``-`` of that
part, then ``method``, ``peft`` and the remaining ``quant_tag``. It agrees with the folder-name fallback of
:func:`awqkit.io.detect.detect_quantization_method` (``<METHOD>_w<bits>_g<group>``).

Metadata always comes from files first (``quantization_metadata.json``, ``training_metadata.json``,
``config.json``); a name is only a fallback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from awqkit.errors import InputError
from awqkit.spec import APPLIED_LM_HEAD_DTYPE, QuantizationSpec

QUANTIZED_SUFFIX = "_quantized"
PATTERN = "{base_model}-{dataset}_{method}_{peft}_{quant_tag}"

_EDGE = r"[A-Za-z0-9]"
_BASE_RE = re.compile(rf"{_EDGE}(?:[A-Za-z0-9.\-]*{_EDGE})?")
_DATASET_RE = re.compile(rf"{_EDGE}(?:[A-Za-z0-9.]*{_EDGE})?")
_TOKEN_RE = re.compile(rf"{_EDGE}(?:[A-Za-z0-9.\-]*{_EDGE})?")
_TAG_METHOD_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:-[A-Za-z][A-Za-z0-9]*)*")  # AWQ, AWQ-GPTQ
_RULES = {
    "base_model": (_BASE_RE, "letters, digits, '.' and '-' (no '_' or '/')"),
    "dataset": (_DATASET_RE, "letters, digits and '.' (no '-' or '_')"),
    "method": (_TOKEN_RE, "letters, digits, '.' and '-' (no '_')"),
    "peft": (_TOKEN_RE, "letters, digits, '.' and '-' (no '_')"),
}
_W_RE = re.compile(r"w(\d+)(?:a(\d+))?", re.IGNORECASE)
_G_RE = re.compile(r"g(-?\d+)", re.IGNORECASE)
_HEAD_RE = re.compile(r"head([A-Za-z0-9]+)", re.IGNORECASE)
_KV_RE = re.compile(r"kv(\d+)", re.IGNORECASE)


class RunNameError(InputError):
    """A run name (or one of its parts) does not follow :data:`PATTERN`."""


@dataclass(frozen=True)
class QuantTag:
    """The fields of a quant tag. ``method`` is lowercase; unknown tokens are kept in ``other``."""

    method: str
    weights_bits: int | None = None
    activations_bits: int | None = None
    group_size: int | None = None
    lm_head_dtype: str | None = None
    kv_cache_bits: int | None = None
    symmetric: bool = False
    other: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "weights_bits": self.weights_bits,
            "activations_bits": self.activations_bits,
            "group_size": self.group_size,
            "lm_head_dtype": self.lm_head_dtype,
            "kv_cache_bits": self.kv_cache_bits,
            "symmetric": self.symmetric,
            "other": list(self.other),
        }


@dataclass(frozen=True)
class ParsedRunName:
    """The parts of a run name. ``quantized``: the name carried the ``_quantized`` folder suffix."""

    base_model: str
    dataset: str
    method: str
    peft: str
    quant_tag: str | None = None
    quantized: bool = False
    tag: QuantTag | None = field(default=None, compare=False)

    @property
    def run_name(self) -> str:
        """The name without the ``_quantized`` suffix (what :func:`make_run_name` returns)."""
        return make_run_name(self.base_model, self.dataset, self.method, self.peft, self.quant_tag)

    @property
    def folder_name(self) -> str:
        """The name as a folder: ``run_name`` plus ``_quantized`` when it was a quantized folder."""
        return self.run_name + (QUANTIZED_SUFFIX if self.quantized else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_model": self.base_model,
            "dataset": self.dataset,
            "method": self.method,
            "peft": self.peft,
            "quant_tag": self.quant_tag,
            "quantized": self.quantized,
            "tag": self.tag.to_dict() if self.tag is not None else None,
        }


def _check(part: str, value: Any) -> str:
    rx, allowed = _RULES[part]
    if not isinstance(value, str) or not rx.fullmatch(value):
        hint = ""
        if part == "base_model" and isinstance(value, str) and "/" in value:
            hint = f"; pass the name without its organisation or folder ({base_model_name(value)!r})"
        elif part == "dataset" and isinstance(value, str) and "-" in value:
            hint = f"; e.g. {value.replace('-', '')!r} ('-' separates the base model from the dataset)"
        raise RunNameError(
            f"{part}={value!r} is not valid in a run name ({PATTERN}): it may hold {allowed}, "
            f"starting and ending with a letter or digit{hint}"
        )
    return value


def _check_tag(tag: Any) -> str:
    if not isinstance(tag, str) or not tag:
        raise RunNameError(f"quant_tag={tag!r} must be a non-empty string (or None for no tag)")
    tokens = tag.split("_")
    if not _TAG_METHOD_RE.fullmatch(tokens[0]) or not all(_TOKEN_RE.fullmatch(t) for t in tokens):
        raise RunNameError(
            f"quant_tag={tag!r} is not valid in a run name: it must be '_'-joined tokens of letters, "
            "digits, '.' and '-', the first a method (words of a letter, then letters/digits, joined by '-'), "
            "e.g. 'AWQ_w4_g128_headfp16'"
        )
    if _W_RE.fullmatch(tokens[0]) or _G_RE.fullmatch(tokens[0]):
        raise RunNameError(
            f"quant_tag={tag!r} must start with the quantization method (e.g. 'AWQ_{tag}'), not "
            f"with {tokens[0]!r}; otherwise the peft part would be read as the method"
        )
    if tokens[-1].lower() == QUANTIZED_SUFFIX[1:]:
        raise RunNameError(f"quant_tag={tag!r} must not end with 'quantized' (reserved for the folder suffix)")
    return tag


def parse_quant_tag(tag: str) -> QuantTag:
    """The fields of a quant tag (``AWQ_w4_g128_headfp16`` → awq, 4 bits, group 128, head fp16)."""
    tokens = _check_tag(tag).split("_")
    kw: dict[str, Any] = {"method": tokens[0].lower()}
    other: list[str] = []
    for t in tokens[1:]:
        if (m := _W_RE.fullmatch(t)) and "weights_bits" not in kw:
            kw["weights_bits"] = int(m.group(1))
            kw["activations_bits"] = int(m.group(2)) if m.group(2) else None
        elif (m := _G_RE.fullmatch(t)) and "group_size" not in kw:
            kw["group_size"] = int(m.group(1))
        elif (m := _HEAD_RE.fullmatch(t)) and "lm_head_dtype" not in kw:
            kw["lm_head_dtype"] = m.group(1).lower()
        elif (m := _KV_RE.fullmatch(t)) and "kv_cache_bits" not in kw:
            kw["kv_cache_bits"] = int(m.group(1))
        elif t.lower() == "sym":
            kw["symmetric"] = True
        else:
            other.append(t)
    if kw["method"] in ("fp16", "bf16", "fp32") and "weights_bits" not in kw:
        kw["weights_bits"] = 32 if kw["method"] == "fp32" else 16
    return QuantTag(other=tuple(other), **kw)


def quant_tag(spec: QuantizationSpec, *, head: bool = True) -> str:
    """The quant tag of what ``spec`` applies: ``AWQ_w4_g128_headfp16``, ``RTN_w3_g64`` (``head=False``), ``FP16``.

    Only applied settings are named (weights bits, group size, ``sym`` when there is no zero point, and
    the LM-head dtype unless ``head=False``); parts awqkit does not apply (8-bit activations, a quantized
    KV cache, see ``spec.unapplied()``) are not, since the checkpoint does not have them.
    """
    if not spec.method.quantizes:
        return f"FP{spec.weights_bits}"
    parts = [spec.method.value.upper(), f"w{spec.weights_bits}", f"g{spec.group_size}"]
    if spec.extras.get("zero_point", True) is False:
        parts.append("sym")
    if head:
        parts.append(f"head{APPLIED_LM_HEAD_DTYPE}")
    return "_".join(parts)


_tag_of = quant_tag  # make_run_name's parameter shadows the function


def make_run_name(
    base_model: str, dataset: str, method: str, peft: str, quant_tag: str | QuantizationSpec | None = None
) -> str:
    """``{base_model}-{dataset}_{method}_{peft}_{quant_tag}`` (without ``_{quant_tag}`` when it is None).

    ``quant_tag`` may be a :class:`~awqkit.spec.QuantizationSpec` (its :func:`quant_tag`).

    Raises:
        RunNameError: a part holds characters it may not (see the module docstring for each part).
    """
    if quant_tag is not None and not isinstance(quant_tag, str):
        quant_tag = _tag_of(quant_tag)
    name = "-".join((_check("base_model", base_model), _check("dataset", dataset)))
    name += f"_{_check('method', method)}_{_check('peft', peft)}"
    if quant_tag is not None:
        name += f"_{_check_tag(quant_tag)}"
    return name


def quantized_folder_name(run_name: str) -> str:
    """``<run name>_quantized`` (the run name is checked first)."""
    parse_run_name(run_name)
    return run_name if run_name.endswith(QUANTIZED_SUFFIX) else run_name + QUANTIZED_SUFFIX


def parse_run_name(name: str | PurePath) -> ParsedRunName:
    """Split a run name (or a folder path whose last component is one) into its parts.

    A trailing ``_quantized`` is stripped and recorded in ``quantized``. Round trip:
    ``parse_run_name(make_run_name(*parts)).run_name == make_run_name(*parts)``.

    Raises:
        RunNameError: the name does not follow :data:`PATTERN` (the message says which part is wrong).
    """
    text = str(name).rstrip("/\\")
    text = PurePath(text).name if ("/" in text or "\\" in text) else text
    original = text
    quantized = text.endswith(QUANTIZED_SUFFIX)
    if quantized:
        text = text[: -len(QUANTIZED_SUFFIX)]
    parts = text.split("_", 3)
    if len(parts) < 3:
        raise RunNameError(
            f"{original!r} is not a run name: expected {PATTERN} (quant_tag optional), e.g. "
            "'Qwen3-0.6B-openmath_SFT_NoPeft_AWQ_w4_g128_headfp16'; found "
            f"{len(parts)} '_'-separated part(s) where at least 3 are needed"
        )
    head, method, peft = parts[:3]
    tag = parts[3] if len(parts) == 4 else None
    base_model, dash, dataset = head.rpartition("-")
    if not dash:
        raise RunNameError(
            f"{original!r} is not a run name: its first part {head!r} must be "
            "'{base_model}-{dataset}' (the dataset follows the last '-'; no part but the quant tag may "
            "hold '_')"
        )
    try:
        _check("base_model", base_model)
        _check("dataset", dataset)
        _check("method", method)
        _check("peft", peft)
        parsed_tag = parse_quant_tag(tag) if tag is not None else None
    except RunNameError as exc:
        raise RunNameError(f"{original!r} is not a valid run name: {exc}") from None
    return ParsedRunName(base_model, dataset, method, peft, tag, quantized, parsed_tag)


def base_model_name(model: str | PurePath) -> str:
    """The base-model part for a hub id or folder: ``Qwen/Qwen3-0.6B`` → ``Qwen3-0.6B``."""
    return PurePath(str(model).rstrip("/\\")).name


__all__ = [
    "PATTERN",
    "QUANTIZED_SUFFIX",
    "ParsedRunName",
    "QuantTag",
    "RunNameError",
    "base_model_name",
    "make_run_name",
    "parse_quant_tag",
    "parse_run_name",
    "quant_tag",
    "quantized_folder_name",
]
