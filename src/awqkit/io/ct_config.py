"""A compressed-tensors ``quantization_config``: its config groups, and which group quantizes which linear.

:func:`read_ct_config` checks what :func:`awqkit.io.load.load_quantized` can load: ``pack-quantized``, compressed,
weight-only int quantization (``strategy`` ``group`` or ``channel``, no group act-order), 2..8 bits, one or more
config groups (mixed bit widths: one group per width, as awqkit writes them, or any other grouping).

:func:`scheme_for` picks a linear's group with compressed-tensors' own rules
(``compressed_tensors.utils.match.match_targets`` and ``quantization.lifecycle.apply``): a module matching
``ignore`` is not quantized; its targets rank exact names first, then ``re:`` regexes (``re.match``, anchored at
the start only), then class names (``Linear`` matches every ``nn.Linear``), each kind in sorted order, and the
first one decides; a target string listed by two groups belongs to the later one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from awqkit.errors import CheckpointError
from awqkit.io.validate import check_bits_group, int_setting, name_list


class CTScheme(NamedTuple):
    """One config group's weight settings."""

    bits: int
    group_size: int  # -1: one group per row (strategy "channel")
    zero_point: bool  # asymmetric


def read_ct_config(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """:func:`awqkit.io.load.read_quant_config` for a compressed-tensors config: its normalized dict, whose
    ``bits`` / ``group_size`` / ``zero_point`` are the first group's and ``"groups"`` lists every group as
    ``(targets, CTScheme)`` (see the module docstring). CheckpointError naming what is not supported."""
    groups = raw.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups or not all(isinstance(g, dict) for g in groups.values()):
        n = len(groups) if isinstance(groups, dict) else type(groups).__name__
        raise CheckpointError(
            f"{path}: quantization_config is not supported: expected compressed-tensors config groups "
            f"(objects), found {n}"
        )
    if raw.get("quantization_status", "compressed") != "compressed":
        raise CheckpointError(
            f"{path}: quantization_config compressed-tensors status={raw.get('quantization_status')!r} is not "
            "supported; awqkit loads compressed 'pack-quantized' weight-only checkpoints"
        )
    parsed = [(_targets(path, name, group), _scheme(path, raw, group)) for name, group in groups.items()]
    first = parsed[0][1]
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "bits": first.bits,
        "group_size": first.group_size,
        "zero_point": first.zero_point,
        "modules_to_not_convert": name_list(path, raw, "ignore"),
        "groups": parsed,
        "raw": raw,
    }


def _targets(path: Path, name: str, group: dict[str, Any]) -> list[str]:
    targets = group.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise CheckpointError(
            f"{path}: quantization_config config group {name!r} targets={targets!r} must be a non-empty list of "
            "module names, re: patterns or class names"
        )
    return list(targets)


def _scheme(path: Path, raw: dict[str, Any], group: dict[str, Any]) -> CTScheme:
    fmt = group.get("format") or raw.get("format")
    if fmt != "pack-quantized":
        raise CheckpointError(
            f"{path}: quantization_config compressed-tensors format={fmt!r}, status="
            f"{raw.get('quantization_status')!r} is not supported; awqkit loads compressed 'pack-quantized' "
            "weight-only checkpoints"
        )
    w = group.get("weights") or {}
    if (
        not isinstance(w, dict)
        or group.get("input_activations")
        or w.get("type", "int") != "int"
        or w.get("actorder") == "group"
    ):
        raise CheckpointError(
            f"{path}: quantization_config is not supported: only weight-only int quantization "
            "without group act-order is"
        )
    strategy = w.get("strategy", "group")
    if strategy not in ("group", "channel"):
        raise CheckpointError(
            f"{path}: quantization_config weight strategy {strategy!r} is not supported (use 'group' or 'channel')"
        )
    bits = int_setting(path, w, ("num_bits",), None)
    group_size = -1 if strategy == "channel" else int_setting(path, w, ("group_size",), None)
    check_bits_group(path, bits, group_size)
    symmetric = w.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise CheckpointError(f"{path}: quantization_config symmetric={symmetric!r} must be true or false")
    return CTScheme(bits, group_size, not symmetric)


def _name_hit(name: str, target: str) -> bool:
    """compressed-tensors' ``match_name``: ``re:`` targets ``re.match`` the name, others equal it."""
    return re.match(target[3:], name) is not None if target.startswith("re:") else target == name


def _class_hit(module: nn.Module, target: str) -> bool:
    return any(cls.__name__ == target for cls in type(module).__mro__ if issubclass(cls, nn.Module))


def scheme_for(qc: dict[str, Any], name: str, module: nn.Module) -> CTScheme | None:
    """The settings the config group matching linear ``name`` (``module``) gives it, or None when ``ignore``
    names it or no group targets it (see the module docstring). A config without ``"groups"`` (AutoAWQ's) gives
    every linear its one setting."""
    groups: list[tuple[list[str], CTScheme]] | None = qc.get("groups")
    if groups is None:
        return CTScheme(qc["bits"], qc["group_size"], qc["zero_point"])
    ignore = qc.get("modules_to_not_convert") or []
    if any(_name_hit(name, t) or _class_hit(module, t) for t in ignore):
        return None
    by_target = {t: scheme for targets, scheme in groups for t in targets}
    ranked = sorted(by_target, key=lambda t: ("re:" in t, t))
    hit = next((t for t in ranked if _name_hit(name, t)), None) or next(
        (t for t in ranked if _class_hit(module, t)), None
    )
    return by_target[hit] if hit is not None else None


__all__ = ["CTScheme", "read_ct_config", "scheme_for"]
