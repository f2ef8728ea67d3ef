"""Resolve an :class:`ArchSpec` against a live model: find the layers and the mappings' modules."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import Tensor, nn

from awqkit.arch.names import name_matches
from awqkit.arch.specs import REGISTRY, ArchSpec, Mapping
from awqkit.errors import InputError

logger = logging.getLogger(__name__)


def supported_architectures() -> list[str]:
    """Every ``config.architectures`` name awqkit knows."""
    return sorted(a for spec in REGISTRY for a in spec.architectures)


def spec_for_architectures(names: list[str] | tuple[str, ...]) -> ArchSpec | None:
    """The spec serving the first of ``names`` (``config.architectures``) that awqkit knows, else None."""
    for name in names:
        for spec in REGISTRY:
            if name in spec.architectures:
                return spec
    return None


def resolve_arch(model: nn.Module) -> ArchSpec:
    """The spec for ``model`` (by ``config.architectures``, then class name); loud error if unknown."""
    names = list(getattr(getattr(model, "config", None), "architectures", None) or [])
    names.append(type(model).__name__)
    spec = spec_for_architectures(names)
    if spec is not None:
        return spec
    raise InputError(
        f"unsupported architecture {names[0]!r} (model class {type(model).__name__}); awqkit supports "
        f"{', '.join(supported_architectures())}. Add an ArchSpec in awqkit/arch/specs.py to support it."
    )


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    """``root.get_submodule`` with an error that names the missing path."""
    try:
        return root.get_submodule(dotted)
    except AttributeError as exc:
        raise ValueError(f"module {dotted!r} not found under {type(root).__name__}: {exc}") from exc


def get_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The decoder layers of ``model``."""
    layers = get_submodule(model, spec.layers)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{spec.layers} of {type(model).__name__} is {type(layers).__name__}, not a ModuleList")
    return layers


@dataclass
class ResolvedMapping:
    """A :class:`Mapping` bound to the modules of one decoder layer."""

    mapping: Mapping
    prev: nn.Module
    linears: list[nn.Linear]
    inspect: nn.Module
    heads: tuple[int, int] | None = None  # (head_dim, n_rep) when scales are tied per kv head


def _tied_heads(layer: nn.Module, m: Mapping, prev_out: int, in_features: int, layer_index: int) -> tuple[int, int]:
    """(head_dim, n_rep) for a grouped-query v → o mapping, with checks that the repeat is what it seems."""
    if m.tie_heads is None:
        raise ValueError(f"layer {layer_index}: mapping {m.prev} names no tie_heads module; cannot tie its scales")
    attn = get_submodule(layer, m.tie_heads)
    head_dim = getattr(attn, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"layer {layer_index}: {m.tie_heads} has no integer head_dim; cannot tie {m.prev} scales")
    if prev_out % head_dim or in_features % prev_out:
        raise ValueError(
            f"layer {layer_index}: cannot tie {m.prev} ({prev_out} outputs) to {list(m.linears)} ({in_features} "
            f"inputs) with head_dim {head_dim}: sizes are not whole heads / whole repeats"
        )
    return head_dim, in_features // prev_out


def resolve_mappings(
    layer: nn.Module, spec: ArchSpec, layer_index: int, *, tie_heads: bool = False
) -> list[ResolvedMapping]:
    """Bind every mapping of ``spec`` to ``layer``.

    Mappings whose shapes do not match are skipped, unless ``tie_heads`` is on and the mapping names a
    ``tie_heads`` attention module: then it is bound with ``heads=(head_dim, n_rep)``.
    """
    out: list[ResolvedMapping] = []
    for m in spec.mappings:
        prev = get_submodule(layer, m.prev)
        modules = [get_submodule(layer, n) for n in m.linears]
        linears: list[nn.Linear] = []
        for name, lin in zip(m.linears, modules, strict=True):
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"layer {layer_index}: {name} is {type(lin).__name__}, expected nn.Linear")
            linears.append(lin)
        heads = None
        if m.require_shapes_match:
            prev_weight = prev.weight
            if not isinstance(prev_weight, Tensor):
                raise ValueError(f"layer {layer_index}: {m.prev} is {type(prev).__name__} and has no weight tensor")
            prev_out = prev_weight.shape[0]
            if any(lin.in_features != prev_out for lin in linears):
                if tie_heads and m.tie_heads and len({lin.in_features for lin in linears}) == 1:
                    heads = _tied_heads(layer, m, prev_out, linears[0].in_features, layer_index)
                    out.append(ResolvedMapping(m, prev, linears, get_submodule(layer, m.inspect), heads))
                    continue
                if layer_index == 0:
                    logger.info(
                        "skipping mapping %s -> %s: output size %d != input size %d (grouped-query attention)",
                        m.prev,
                        list(m.linears),
                        prev_out,
                        linears[0].in_features,
                    )
                continue
        out.append(ResolvedMapping(m, prev, linears, get_submodule(layer, m.inspect)))
    return out


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside one decoder layer, by layer-relative name."""
    return {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}


def matches(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """True when full module ``name`` matches any pattern: the exact name, a dotted suffix ending at a
    component boundary (``mlp.down_proj``, ``down_proj``), or a ``re:`` regex that fullmatches.

    Never a substring test: ``gate`` does not match ``mlp.gate_proj``. One implementation for the whole
    package (:func:`awqkit.arch.names.name_matches`).
    """
    return any(name_matches(name, p) for p in patterns)
