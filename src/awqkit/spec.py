"""What a quantization run asks for: :class:`QuantMethod` and :class:`QuantizationSpec`.

A spec is the platform's vocabulary for "how should this model be quantized". awqkit quantizes
**weights only** (round-to-nearest, AWQ, GPTQ, AdaRound, or AWQ followed by GPTQ or block refinement, 2..8
bits, per-group scales, optionally other widths for some linears), keeps the LM head and the
embeddings in fp16, and writes AutoAWQ ``gemm`` (4 bits) or compressed-tensors ``pack-quantized``
(any widths) checkpoints. A spec may ask for more (8-bit activations, a quantized KV cache, a
quantized LM head, extra settings awqkit does not know): those parts are
*planned, not applied*. They are kept in the spec, listed by :meth:`QuantizationSpec.unapplied`,
logged as a warning when quantizing (:func:`warn_unapplied`) and written as ``"not_applied"`` in
``quantization_metadata.json`` (:func:`spec_metadata`); nothing pretends they were done.

On disk (``quantization_metadata.json``)::

    "spec": {"method": "awq", "weights_bits": 4, "activations_bits": null, "kv_cache_bits": null,
             "group_size": 128, "lm_head_dtype": "fp16", "format": "auto", "extras": {}},
    "not_applied": []

``activations_bits`` / ``kv_cache_bits``: None (or 16) means float (fp16/bf16 at run time).
``format``: the checkpoint's storage format, :attr:`QuantConfig.format <awqkit.config.QuantConfig>`'s vocabulary:
``auto`` (``gemm`` at 4 bits, ``compressed-tensors`` otherwise), ``gemm`` (4 bits only) or ``compressed-tensors``
(``pack-quantized`` at any width; ``pack-quantized`` is read as it). Older specs call it ``backend``; that key is
still read (in awqkit "backend" means only the kernel that runs a quantized layer). ``extras``: further
:class:`~awqkit.config.QuantConfig` settings (``zero_point``, ``modules_to_not_convert``,
``keep_unaligned_fp16``, ``bits_overrides``: ``[[pattern, bits], ...]``); any other key is recorded and listed as
not applied.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from dataclasses import dataclass, field
from typing import Any

from awqkit.config import (
    FORMATS,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    QuantConfig,
    Rounding,
    SearchConfig,
    canonical_format,
)
from awqkit.errors import InputError

logger = logging.getLogger(__name__)

FLOAT_BITS = 16
FLOAT_WEIGHT_BITS = (16, 32)
#: Old spec keys still read, and the key each now is.
SPEC_KEY_ALIASES = {"backend": "format"}
#: The only LM-head dtype awqkit applies (the head and the embeddings are never quantized).
APPLIED_LM_HEAD_DTYPE = "fp16"
#: ``extras`` keys applied through :class:`QuantConfig`.
APPLIED_EXTRAS = ("zero_point", "modules_to_not_convert", "keep_unaligned_fp16", "bits_overrides")
_SPEC_KEY = "spec"
_NOT_APPLIED_KEY = "not_applied"


class QuantMethod(str, enum.Enum):  # noqa: UP042 - str() of a member stays 'QuantMethod.X'
    """How weights are quantized. ``NONE`` is the float model (aliases ``fp16``, ``bf16``, ``fp``, ``float``)."""

    NONE = "none"
    RTN = "rtn"
    AWQ = "awq"
    GPTQ = "gptq"
    ADAROUND = "adaround"
    AWQ_GPTQ = "awq-gptq"
    AWQ_REFINE = "awq-refine"

    @classmethod
    def _missing_(cls, value: object) -> QuantMethod | None:
        if isinstance(value, str):
            v = value.strip().lower()
            if v in ("fp16", "bf16", "fp32", "fp", "float", "float16", "bfloat16", "float32", "none"):
                return cls.NONE
            for m in cls:
                if m.value == v:
                    return m
        return None

    @classmethod
    def parse(cls, value: str | QuantMethod) -> QuantMethod:
        """``value`` as a method (case-insensitive, aliases accepted); a clear ValueError otherwise."""
        if isinstance(value, QuantMethod):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"quantization method {value!r} is not known; choose one of "
                f"{[m.value for m in cls]} (or fp16 for the float model)"
            ) from None

    @property
    def quantizes(self) -> bool:
        return self is not QuantMethod.NONE

    @property
    def calibrates(self) -> bool:
        """Whether the method runs the calibrated layer loop (every quantizing method but round-to-nearest)."""
        return self.quantizes and self is not QuantMethod.RTN

    def search_config(self, search: SearchConfig) -> SearchConfig:
        """``search`` with what this method fixes: ``gptq`` and ``adaround`` round each linear of the unscaled,
        unclipped model (no AWQ scale or clip search); ``awq-gptq`` and ``awq-refine`` are AWQ followed by
        ``rounding="gptq"`` / ``"refine"``; ``awq`` keeps ``search.rounding`` as given. A ``search.rounding``
        other than ``"none"`` that disagrees with the method is refused."""
        rounding = _METHOD_ROUNDING.get(self.value)
        if rounding is None:
            return search
        if search.rounding not in ("none", rounding):
            raise InputError(
                f"method {self.value!r} rounds with {rounding!r}, but rounding={search.rounding!r} was "
                f"asked for; drop the rounding option, or use method 'awq' with it"
            )
        scaled = self not in (QuantMethod.GPTQ, QuantMethod.ADAROUND)  # rounding alone: no scale or clip search
        return dataclasses.replace(
            search, rounding=rounding, scales=scaled and search.scales, clip=scaled and search.clip
        )


#: The rounding each combined method fixes (:meth:`QuantMethod.search_config`).
_METHOD_ROUNDING: dict[str, Rounding] = {
    "gptq": "gptq",
    "adaround": "adaround",
    "awq-gptq": "gptq",
    "awq-refine": "refine",
}


@dataclass(frozen=True)
class QuantizationSpec:
    """A quantization request (see the module docstring). Build one with :func:`resolve_quantization_spec`."""

    method: QuantMethod = QuantMethod.AWQ
    weights_bits: int = 4
    activations_bits: int | None = None
    kv_cache_bits: int | None = None
    group_size: int | None = 128
    lm_head_dtype: str = APPLIED_LM_HEAD_DTYPE
    format: str = "auto"
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", QuantMethod.parse(self.method))
        object.__setattr__(self, "extras", {str(k): _plain(v) for k, v in dict(self.extras or {}).items()})
        object.__setattr__(self, "lm_head_dtype", str(self.lm_head_dtype).lower())
        for name in ("weights_bits", "activations_bits", "kv_cache_bits", "group_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"{name}={v!r} must be an integer{'' if name == 'weights_bits' else ' or None'}")
        for name in ("activations_bits", "kv_cache_bits"):
            v = getattr(self, name)
            if v is not None and not 1 <= v <= 32:
                raise ValueError(f"{name}={v} is not a bit width; use None (float) or e.g. 8")
        object.__setattr__(self, "format", canonical_format(self.format))
        if not self.method.quantizes:
            if self.weights_bits not in FLOAT_WEIGHT_BITS:
                raise ValueError(
                    f"method none (float) keeps float weights ({FLOAT_WEIGHT_BITS} bits); got "
                    f"weights_bits={self.weights_bits}. Choose rtn or awq to quantize"
                )
            if self.group_size is not None:
                raise ValueError("method none (float) has no group_size; leave it None")
            return
        if self.weights_bits not in SUPPORTED_BITS:
            raise ValueError(f"weights_bits={self.weights_bits} is not supported; choose one of {SUPPORTED_BITS}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size} is not supported; choose one of {SUPPORTED_GROUP_SIZES}")
        if self.format == "gemm" and self.weights_bits != 4:
            raise InputError(
                f"format 'gemm' holds 4-bit weights only; weights_bits={self.weights_bits} is "
                "written as 'compressed-tensors' (use format 'auto' or 'compressed-tensors')"
            )
        self.to_quant_config()  # validated through QuantConfig so a bad value fails now, not at quantize time

    # ------------------------------------------------------------------------------ derived views
    @property
    def written_format(self) -> str | None:
        """The checkpoint format awqkit writes for this spec (None for the float model): ``format`` resolved,
        ``"gemm"`` or ``"compressed-tensors"`` (:attr:`QuantConfig.output_format`)."""
        if not self.method.quantizes:
            return None
        return self.to_quant_config().output_format

    def unapplied(self) -> list[str]:
        """``"key=value"`` for each part of the spec awqkit records but does not apply (empty: all applied)."""
        out: list[str] = []
        if self.activations_bits not in (None, FLOAT_BITS):
            out.append(f"activations_bits={self.activations_bits}")
        if self.kv_cache_bits not in (None, FLOAT_BITS):
            out.append(f"kv_cache_bits={self.kv_cache_bits}")
        if self.lm_head_dtype != APPLIED_LM_HEAD_DTYPE:
            out.append(f"lm_head_dtype={self.lm_head_dtype}")
        for key in sorted(self.extras):
            if key not in APPLIED_EXTRAS or not self.method.quantizes:
                out.append(f"extras.{key}={self.extras[key]!r}")
        return out

    def describe(self) -> str:
        """One line: ``awq w4 g128, lm_head fp16, format gemm`` (+ what is not applied)."""
        if not self.method.quantizes:
            text = f"none (float, {self.weights_bits}-bit weights)"
        else:
            g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
            text = (
                f"{self.method.value} w{self.weights_bits} {g}, lm_head {APPLIED_LM_HEAD_DTYPE}, "
                f"format {self.written_format}"
            )
            zp = self.extras.get("zero_point", True)
            text += "" if zp else ", symmetric"
            overrides = self.extras.get("bits_overrides") or []
            text += "".join(f", {pattern} w{bits}" for pattern, bits in overrides)
        missing = self.unapplied()
        if missing:
            text += f"; planned, not applied: {', '.join(missing)}"
        return text

    def to_quant_config(self) -> QuantConfig:
        """The :class:`QuantConfig` awqkit quantizes with (weights only; see :meth:`unapplied`).

        Raises:
            ValueError: the method is ``none`` (nothing to quantize) or an extra has a bad value.
        """
        if not self.method.quantizes:
            raise ValueError("method none (float) does not quantize; there is no QuantConfig for it")
        kwargs = {k: self.extras[k] for k in APPLIED_EXTRAS if k in self.extras}
        if "modules_to_not_convert" in kwargs:
            mods = kwargs["modules_to_not_convert"]
            kwargs["modules_to_not_convert"] = (mods,) if isinstance(mods, str) else tuple(mods)
        return QuantConfig(
            bits=self.weights_bits,
            group_size=int(self.group_size),  # type: ignore[arg-type]
            keep_lm_head_fp16=True,
            format=self.format,
            **kwargs,
        )

    @classmethod
    def from_quant_config(cls, method: str | QuantMethod, quant: QuantConfig) -> QuantizationSpec:
        """The spec that ``quantize(method=..., quant=quant)`` applies (nothing unapplied)."""
        base = QuantConfig()
        extras: dict[str, Any] = {}
        for key in APPLIED_EXTRAS:
            value = getattr(quant, key)
            if value != getattr(base, key):
                extras[key] = _plain(value)
        return cls(
            method=QuantMethod.parse(method),
            weights_bits=quant.bits,
            group_size=quant.group_size,
            format=quant.format,
            extras=extras,
        )

    # ------------------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the ``"spec"`` entry of ``quantization_metadata.json``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["method"] = self.method.value
        out["extras"] = {k: _plain(v) for k, v in self.extras.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizationSpec:
        """Inverse of :meth:`to_dict`; unknown keys (e.g. ``not_applied``) are ignored."""
        if not isinstance(data, dict) or "method" not in data:
            raise ValueError(f"a quantization spec needs at least a 'method'; got {data!r:.200}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in unalias_spec_keys(data).items() if k in names})


def _plain(value: Any) -> Any:
    """``value`` with its tuples (also nested, e.g. ``bits_overrides`` pairs) as lists: what JSON gives back."""
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def unalias_spec_keys(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with old spec keys (:data:`SPEC_KEY_ALIASES`) renamed; both spellings at once is an error."""
    out = dict(data)
    for old, new in SPEC_KEY_ALIASES.items():
        if old in out:
            if new in out and out[new] != out[old]:
                raise ValueError(f"{old!r} is the old name of {new!r}; pass only {new}={out[new]!r}")
            out[new] = out.pop(old)
    return out


def resolve_quantization_spec(
    method: str | QuantMethod | QuantizationSpec = "awq", **overrides: Any
) -> QuantizationSpec:
    """A spec for ``method`` with its defaults, then ``overrides``.

    Defaults: ``awq`` / ``rtn``: 4-bit weights, group size 128, fp16 LM head, float activations and KV
    cache, format ``auto``; ``none`` (alias ``fp16``): 16-bit weights, no group size. Overrides are spec
    fields (``weights_bits``, ``activations_bits``, ``kv_cache_bits``, ``group_size``, ``lm_head_dtype``,
    ``format``, ``extras``); ``bits`` is accepted for ``weights_bits``, ``backend`` for ``format``, and
    :class:`QuantConfig` settings (``zero_point``, ``modules_to_not_convert``, ``keep_unaligned_fp16``,
    ``bits_overrides``) go to ``extras``. ``method`` may also be a spec, which the overrides then modify.

    Raises:
        ValueError: unknown method, unknown override, or an invalid value.
    """
    if isinstance(method, QuantizationSpec):
        base = method
    else:
        m = QuantMethod.parse(method)
        base = QuantizationSpec(m) if m.quantizes else QuantizationSpec(m, weights_bits=FLOAT_BITS, group_size=None)
    overrides = unalias_spec_keys(overrides)
    if "bits" in overrides:
        if "weights_bits" in overrides:
            raise ValueError("pass either bits or weights_bits, not both")
        overrides["weights_bits"] = overrides.pop("bits")
    if "method" in overrides:
        raise ValueError("pass the method as the first argument, not as an override")
    extras = dict(base.extras)
    extras.update(overrides.pop("extras", None) or {})
    for key in APPLIED_EXTRAS:
        if key in overrides:
            extras[key] = overrides.pop(key)
    fields = {f.name for f in dataclasses.fields(QuantizationSpec)} - {"method", "extras"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown quantization setting(s) {unknown}; valid: {sorted(fields | {'bits', 'extras'})} "
            f"and {list(APPLIED_EXTRAS)}"
        )
    return dataclasses.replace(base, extras=extras, **overrides)


def warn_unapplied(spec: QuantizationSpec, log: logging.Logger | None = None) -> list[str]:
    """Log a warning naming the parts of ``spec`` that awqkit does not apply; returns them."""
    missing = spec.unapplied()
    if missing:
        (log or logger).warning(
            "awqkit quantizes weights only: %s %s planned but NOT applied (recorded as not_applied in "
            "quantization_metadata.json); activations, KV cache and LM head stay in fp16",
            ", ".join(missing),
            "is" if len(missing) == 1 else "are",
        )
    return missing


def spec_metadata(spec: QuantizationSpec) -> dict[str, Any]:
    """The entries to merge into ``quantization_metadata.json``: ``{"spec": ..., "not_applied": [...]}``."""
    return {_SPEC_KEY: spec.to_dict(), _NOT_APPLIED_KEY: spec.unapplied()}


def spec_from_metadata(meta: dict[str, Any]) -> QuantizationSpec | None:
    """The spec recorded in a ``quantization_metadata.json`` dict.

    Uses its ``"spec"`` entry; for folders written before specs existed, rebuilds the (weights-only)
    spec from ``method`` / ``bits`` / ``group_size`` / ``quant_config``. None when neither is there. A format the
    writer recorded as not applied (awqkit before 4-bit compressed-tensors export) reads as ``auto``, what it wrote.
    """
    if isinstance(meta.get(_SPEC_KEY), dict):
        spec = QuantizationSpec.from_dict(meta[_SPEC_KEY])
        not_applied = meta.get(_NOT_APPLIED_KEY)
        if isinstance(not_applied, list) and any(str(x).startswith("format=") for x in not_applied):
            spec = dataclasses.replace(spec, format="auto")
        return spec
    method = meta.get("method")
    if not isinstance(method, str):
        return None
    try:
        m = QuantMethod.parse(method)
    except ValueError:
        return None
    if not m.quantizes:
        return QuantizationSpec(m, weights_bits=FLOAT_BITS, group_size=None)
    raw_qc = meta.get("quant_config")
    qc: dict[str, Any] = raw_qc if isinstance(raw_qc, dict) else {}
    try:
        quant = QuantConfig(
            bits=int(meta.get("bits", qc.get("bits", 4))),
            group_size=int(meta.get("group_size", qc.get("group_size", 128))),
            zero_point=bool(meta.get("zero_point", qc.get("zero_point", True))),
            modules_to_not_convert=tuple(qc.get("modules_to_not_convert", ())),
            keep_unaligned_fp16=bool(qc.get("keep_unaligned_fp16", False)),
            format=str(qc.get("format", "auto")),
            bits_overrides=qc.get("bits_overrides", ()),
        )
    except (TypeError, ValueError):
        return None
    return QuantizationSpec.from_quant_config(m, quant)


__all__ = [
    "FORMATS",
    "SPEC_KEY_ALIASES",
    "unalias_spec_keys",
    "QuantMethod",
    "QuantizationSpec",
    "resolve_quantization_spec",
    "spec_from_metadata",
    "spec_metadata",
    "warn_unapplied",
]
