"""Which linears of the decoder layers a run quantizes (:func:`select_targets`), and which stay float and why.

Rules: every ``nn.Linear`` inside the decoder layers, minus the architecture's and the user's exclusions
(``modules_to_not_convert``: exact names or ``re:`` patterns); a linear whose shape does not fit the group size
(or the 4-bit GEMM layout) is an error, or kept in fp16 under ``keep_unaligned_fp16``; the linears that vLLM fuses
into one module (``ArchSpec.fused``: q/k/v, gate/up) are quantized all or none.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from awqkit.arch import ArchSpec, get_layers, layer_linears, matches
from awqkit.config import QuantConfig
from awqkit.errors import InputError

logger = logging.getLogger(__name__)


@dataclass
class Targets:
    """Which decoder-layer linears get quantized, and which stay float (and why)."""

    quantized: list[str]
    kept: dict[str, str] = field(default_factory=dict)  # name -> reason


def select_targets(model: nn.Module, spec: ArchSpec, qcfg: QuantConfig) -> Targets:
    """Every ``nn.Linear`` inside the decoder layers, minus exclusions; shape problems are loud.

    A linear whose ``in_features`` is not a multiple of the group size (or, at 4 bits, whose
    ``out_features`` is not a multiple of 8, required by the GEMM layout) is an error naming it and the
    group sizes that would work, unless ``qcfg.keep_unaligned_fp16`` (then it stays fp16, with a warning).

    Fused groups are quantized all or none. vLLM fuses some linears of a layer into one module (q/k/v into
    ``qkv_proj``, gate/up into ``gate_up_proj``: ``spec.fused``) and refuses a checkpoint in which only some
    shards of a fused module are quantized. So, per layer and group: a ``modules_to_not_convert`` pattern that
    keeps part of a group in float while the rest would be quantized is an :class:`InputError` naming the group
    and the fix; under ``keep_unaligned_fp16`` a group with a member that does not fit is kept in fp16 whole
    (one warning per group). Linears in no group (o_proj, down_proj) are decided alone. vLLM also loads a fused
    module with one scheme: ``bits_overrides`` that give a group's members different widths, or that match no
    quantized linear at all, are an :class:`InputError` too (:func:`_check_bits_overrides`).
    """
    out = Targets([])
    not_convert = [f"re:{p}" for p in spec.not_convert] + list(qcfg.modules_to_not_convert)
    unaligned: list[tuple[str, nn.Linear]] = []
    layers = get_layers(model, spec)
    seen: set[str] = set()
    for i, layer in enumerate(layers):
        for rel, mod in layer_linears(layer).items():
            name = f"{spec.layers}.{i}.{rel}"
            seen.add(name)
            if matches(name, not_convert):
                out.kept[name] = "modules_to_not_convert"
                continue
            g = mod.in_features if qcfg.group_size == -1 else qcfg.group_size
            gemm = qcfg.layout == "gemm"
            if mod.in_features % g or (gemm and mod.out_features % 8):
                unaligned.append((name, mod))
                out.kept[name] = (
                    f"shape [{mod.out_features}x{mod.in_features}] does not fit group_size {g}"
                    f"{' and the 4-bit GEMM layout' if gemm else ''}"
                )
                continue
            out.quantized.append(name)
    groups = _fused_groups(spec, len(layers), seen)
    if unaligned:
        listed = ", ".join(f"{n} [{m.out_features}x{m.in_features}]" for n, m in unaligned[:6])
        # a group size cannot fix an output size the GEMM layout refuses: say which constraint failed
        by_out = [n for n, m in unaligned if qcfg.layout == "gemm" and m.out_features % 8]
        ins = {m.in_features for n, m in unaligned if n not in by_out}
        ok = [g for g in (32, 64, 128, 256) if all(n % g == 0 for n in ins)] + [-1]
        fix = f"Group sizes that fit every layer: {ok}. " if len(by_out) < len(unaligned) else ""
        if by_out:
            fix += (
                f"{', '.join(by_out[:3])}{' ...' if len(by_out) > 3 else ''}: an output size that is not a multiple "
                "of 8 fits no group size in the 4-bit GEMM layout; write --format compressed-tensors for it. "
            )
        fix += "Or keep these layers in fp16 with --keep-unaligned-fp16."
        msg = (
            f"{len(unaligned)} linears do not fit group_size={qcfg.group_size}"
            f"{' (4-bit GEMM also needs out_features % 8 == 0)' if qcfg.layout == 'gemm' else ''}: "
            f"{listed}{' ...' if len(unaligned) > 6 else ''}."
        )
        if not qcfg.keep_unaligned_fp16:
            raise InputError(f"{msg} {fix}")
        logger.warning("%s Keeping them in fp16 as asked.", msg)
        _keep_fused_groups_whole(groups, out, {n for n, _ in unaligned})
    _check_fused_exclusions(groups, out, spec, qcfg)
    _check_bits_overrides(groups, out, qcfg)
    all_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for pattern in qcfg.modules_to_not_convert:
        if not any(matches(n, (pattern,)) for n in all_linears):
            logger.warning("modules_to_not_convert entry %r matches no linear layer of this model", pattern)
    if not out.quantized:
        raise InputError("no linear layer is left to quantize; check modules_to_not_convert and group_size")
    return out


@dataclass(frozen=True)
class _FusedGroup:
    """One fused group of one decoder layer: its index, its layer-relative names and its full names."""

    layer: int
    rels: tuple[str, ...]
    names: tuple[str, ...]


def _fused_groups(spec: ArchSpec, n_layers: int, linears: set[str]) -> list[_FusedGroup]:
    """Every (layer, fused group) of the model; a member that is no linear of its layer is an error in the spec."""
    out = []
    for i in range(n_layers):
        for rels in spec.fused:
            names = tuple(f"{spec.layers}.{i}.{rel}" for rel in rels)
            missing = [n for n in names if n not in linears]
            if missing:
                raise ValueError(f"ArchSpec {spec.name!r}: fused group {list(rels)} names {missing}, no nn.Linear")
            out.append(_FusedGroup(i, tuple(rels), names))
    return out


def _keep_fused_groups_whole(groups: list[_FusedGroup], out: Targets, unaligned: set[str]) -> None:
    """Keep in fp16 every member of a fused group that has an unaligned member (``keep_unaligned_fp16``): one
    warning per group, its other members' ``kept`` reason naming the member that does not fit."""
    quantized = set(out.quantized)
    pulled: dict[tuple[tuple[str, ...], tuple[str, ...]], list[int]] = {}
    for grp in groups:
        bad = [(rel, n) for rel, n in zip(grp.rels, grp.names, strict=True) if n in unaligned]
        if not bad or not quantized.intersection(grp.names):
            continue
        rel, name = bad[0]
        for n in grp.names:
            if n in quantized:
                quantized.discard(n)
                out.kept[n] = f"kept in fp16 with its fused group ({rel}: {out.kept[name]})"
        pulled.setdefault((grp.rels, tuple(r for r, _ in bad)), []).append(grp.layer)
    out.quantized = [n for n in out.quantized if n in quantized]
    for (rels, bad_rels), layer_ids in pulled.items():
        logger.warning(
            "fused group %s of layer%s %s: %s do%s not fit, so the whole group stays in fp16 (vLLM loads a fused "
            "module only when all or none of its shards are quantized)",
            _alternation(rels),
            "s" if len(layer_ids) > 1 else "",
            _ranges(layer_ids),
            ", ".join(bad_rels),
            "es" if len(bad_rels) == 1 else "",
        )


def _check_fused_exclusions(groups: list[_FusedGroup], out: Targets, spec: ArchSpec, qcfg: QuantConfig) -> None:
    """InputError when ``modules_to_not_convert`` keeps part of a fused group in float and the rest is quantized."""
    quantized = set(out.quantized)
    split = [
        g
        for g in groups
        if quantized.intersection(g.names) and any(out.kept.get(n) == "modules_to_not_convert" for n in g.names)
    ]
    if not split:
        return
    first = split[0]
    members = list(zip(first.rels, first.names, strict=True))
    excluded = [rel for rel, n in members if n not in quantized]
    included = [rel for rel, n in members if n in quantized]
    kept_names = [n for n in first.names if out.kept.get(n) == "modules_to_not_convert"]
    patterns = [p for p in qcfg.modules_to_not_convert if any(matches(n, (p,)) for n in kept_names)]
    every_layer = len({g.layer for g in split if g.rels == first.rels}) == len({g.layer for g in groups}) > 1
    where = r"\d+" if every_layer else str(first.layer)
    example = f"re:{re.escape(spec.layers)}\\.{where}\\.{_alternation(first.rels, re.escape)}"
    n_more = len(split) - 1
    more = f" (and {n_more} more split group{'s' if n_more > 1 else ''})" if n_more else ""
    raise InputError(
        f"modules_to_not_convert {patterns} splits the fused group {_alternation(first.rels)} of layer "
        f"{first.layer}{more}: it excludes {', '.join(excluded)} but not {', '.join(included)}; vLLM fuses the "
        f"group into one module and refuses a checkpoint with only some of its shards quantized. Exclude the whole "
        f"group, e.g. add `{example}` to --modules-to-not-convert, or remove the pattern."
    )


def _check_bits_overrides(groups: list[_FusedGroup], out: Targets, qcfg: QuantConfig) -> None:
    """InputError when a ``bits_overrides`` pattern matches no quantized linear (a typo would silently keep the
    default width), or gives the quantized members of a fused group different widths (vLLM loads the fused
    module with one scheme)."""
    for pattern, bits in qcfg.bits_overrides:
        if not any(matches(n, (pattern,)) for n in out.quantized):
            raise InputError(
                f"bits override {pattern!r}={bits} matches no quantized linear; patterns are full or trailing "
                "module names (down_proj, mlp.down_proj) or re:REGEX matching the full name"
            )
    quantized = set(out.quantized)
    for grp in groups:
        widths = {rel: qcfg.bits_for(n) for rel, n in zip(grp.rels, grp.names, strict=True) if n in quantized}
        if len(set(widths.values())) > 1:
            listed = ", ".join(f"{rel} {bits}" for rel, bits in widths.items())
            raise InputError(
                f"bits overrides give the fused group {_alternation(grp.rels)} of layer {grp.layer} different bit "
                f"widths ({listed}); vLLM fuses the group into one module with one width. Give the whole group one "
                f"width, e.g. re:.*\\.{_alternation(grp.rels, re.escape)}=BITS"
            )


def _alternation(rels: tuple[str, ...], escape: Callable[[str], str] = str) -> str:
    """``self_attn.(q|k|v)_proj`` for ``(self_attn.q_proj, self_attn.k_proj, self_attn.v_proj)``; a regex when
    ``escape`` is :func:`re.escape`."""
    parents = {r.rpartition(".")[0] for r in rels}
    leaves = [r.rpartition(".")[2] for r in rels]
    if len(parents) != 1:
        return "(" + "|".join(escape(r) for r in rels) + ")"
    parent = parents.pop()
    head = os.path.commonprefix(leaves)
    tail = os.path.commonprefix([leaf[len(head) :][::-1] for leaf in leaves])[::-1]
    stems = [leaf[len(head) : len(leaf) - len(tail)] for leaf in leaves]
    if not all(stems):
        head, tail, stems = "", "", leaves
    return f"{escape(parent + '.') if parent else ''}{escape(head)}({'|'.join(escape(s) for s in stems)}){escape(tail)}"


def _ranges(ids: list[int]) -> str:
    """``0-3, 7`` for ``[0, 1, 2, 3, 7]``."""
    parts: list[str] = []
    for i in sorted(ids):
        if parts and parts[-1].rpartition("-")[2] == str(i - 1):
            parts[-1] = f"{parts[-1].partition('-')[0]}-{i}"
        else:
            parts.append(str(i))
    return ", ".join(parts)


__all__ = ["Targets", "select_targets"]
