"""Process-local kernel caches on a QuantLinear: which source tensors a cache was built from, and whether
they are still the module's current, unmodified buffers; plus the layer checks the CPU kernels share.

A fast backend converts a module's packed buffers once into its own layout and keeps the result in a
private attribute (not a buffer: not in ``state_dict()``, not moved by ``.to()``). The cache records a weak
reference and the version counter of every source tensor; it is stale once a source is replaced
(``load_state_dict(assign=True)``, ``.to(device)``) or modified in place (``copy_``).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from awqkit.nn.qlinear import QuantLinear

logger = logging.getLogger(__name__)

#: buffers a conversion reads, per QuantLinear storage format
SOURCES = {
    "gemm": ("qweight", "qzeros", "scales", "bias"),
    "pack-quantized": ("weight_packed", "weight_scale", "weight_zero_point", "bias"),
}

Signature = tuple[tuple[str, "weakref.ref | None", "int | None"], ...]


def get_tensor(module: QuantLinear, name: str) -> Tensor | None:
    buffers = module._buffers
    return buffers[name] if name in buffers else getattr(module, name, None)  # fast path for buffers


def source_tensors(module: QuantLinear) -> tuple[Tensor | None, ...]:
    """The tensors a conversion reads (packed ints, scales, zeros, bias), None where absent."""
    return tuple(get_tensor(module, n) for n in SOURCES.get(module.format, ()))


def effective_group_size(module: QuantLinear) -> int:
    """The module's group size, with ``-1`` (one group per row) spelled as ``in_features``."""
    return module.in_features if module.group_size == -1 else int(module.group_size)


def cpu_layout_reason(module: QuantLinear, n_multiple: int) -> str | None:
    """Why a CPU kernel that tiles output columns by ``n_multiple`` cannot take this layer's shape or
    placement (``in_features`` not whole groups, ``out_features`` not whole tiles, buffers off the CPU), or None."""
    g = effective_group_size(module)
    if module.in_features % g != 0:
        return f"in_features={module.in_features} is not a multiple of group_size={g}"
    if module.out_features % n_multiple != 0:
        return f"out_features={module.out_features} is not a multiple of {n_multiple}"
    devices = {t.device.type for t in source_tensors(module) if t is not None}
    if devices != {"cpu"}:
        return f"packed buffers on {', '.join(sorted(devices))} (needs cpu)"
    return None


def _version(t: Tensor) -> int | None:
    return None if t.is_inference() else t._version  # inference tensors have no version counter


def signature(module: QuantLinear) -> Signature:
    """``(name, weak reference or None when absent, version counter)`` of every source tensor."""
    out = []
    for name in SOURCES.get(module.format, ()):
        t = get_tensor(module, name)
        out.append((name, None, None) if t is None else (name, weakref.ref(t), _version(t)))
    return tuple(out)


def matches(sources: Signature, module: QuantLinear) -> bool:
    """True when ``sources`` (a :func:`signature`) still describes the module's current buffers."""
    for name, ref, version in sources:
        t = get_tensor(module, name)
        if t is None:
            if ref is not None:
                return False
        elif ref is None or _version(t) != version or ref() is not t:
            return False
    return True


def dropped() -> None:
    """Unpickling target of a cache: caches pickle as None (weak references do not pickle, and a
    converted layout may be specific to the CPU it was built on)."""
    return None


@dataclass(frozen=True)
class PrepareReport:
    """What a backend's ``prepare_model`` did: layers converted, layers left to other backends and why."""

    converted: int
    fallback: int
    reasons: dict[str, str]

    def as_counts(self) -> dict[str, int]:
        return {"converted": self.converted, "fallback": self.fallback}


def is_quant_linear(module: nn.Module) -> bool:
    """Whether ``module`` is an :class:`awqkit.nn.qlinear.QuantLinear` (by its class marker: nn/ imports the
    kernels, so the kernels cannot import nn/)."""
    return bool(getattr(type(module), "awqkit_quant_linear", False))


def prepare_layers(
    model: nn.Module,
    name: str,
    backend: str,
    unsupported: Callable[[QuantLinear], str | None],
    prepare: Callable[[QuantLinear], object],
) -> PrepareReport:
    """Convert every QuantLinear of ``model`` that backend ``name`` can run, up front.

    ``backend``: ``"auto"`` leaves unsupported layers to the next backend (one INFO line each, with the
    reason); ``name`` itself requires every layer to be supported, else ValueError listing the offenders
    (nothing is converted then). ``unsupported(module)`` gives the reason a layer cannot run (None if it
    can); ``prepare(module)`` converts one layer.
    """
    if backend not in ("auto", name):
        raise ValueError(f"prepare_model prepares for backend 'auto' or {name!r}, got {backend!r}")
    layers = [(n, m) for n, m in model.named_modules() if is_quant_linear(m)]
    reasons = {n: r for n, m in layers if (r := unsupported(m)) is not None}
    if backend == name and reasons:
        listing = "; ".join(f"{n}: {r}" for n, r in list(reasons.items())[:10])
        more = f" (+{len(reasons) - 10} more)" if len(reasons) > 10 else ""
        raise ValueError(
            f"backend={name!r} cannot run {len(reasons)} of {len(layers)} quantized layers: {listing}{more}; "
            "use backend='auto' to run those on another backend"
        )
    converted = 0
    for n, m in layers:
        if n in reasons:
            logger.info("%s: %s falls back to another backend: %s", name, n or "<root>", reasons[n])
            continue
        prepare(m)
        converted += 1
    logger.info("%s: converted %d of %d quantized layers (%d fall back)", name, converted, len(layers), len(reasons))
    return PrepareReport(converted=converted, fallback=len(reasons), reasons=reasons)
