"""Apply searched results to float weights: fold scales, clamp clipped groups. In place, no grad.

Folding is an equivalence transform: for ``y = W (prev(x))`` with ``prev`` a norm or a linear,
dividing prev's output channels by ``s`` and multiplying the columns of every consumer ``W`` by ``s``
leaves ``y`` unchanged in exact arithmetic.

* norm ``x̂ · (offset + w) (+ b)``: ``w ← (offset + w) / s − offset``, ``b ← b / s``
  (offset 0 for Llama-style RMSNorm/LayerNorm, 1 for Gemma's ``(1 + w)``).
* linear: the last ``len(s)`` output rows and bias entries are divided by ``s`` (a fused qkv
  projection feeding only its v part would scale only those rows).
* consumers: ``W[:, j] ← W[:, j] · s_j``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _check_scales(s: Tensor, n: int, where: str) -> None:
    if s.dim() != 1 or s.numel() != n:
        raise ValueError(f"{where}: scales must be 1-D of size {n}, got {tuple(s.shape)}")
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError(f"{where}: scales must be finite and positive")


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear], s: Tensor, norm_offset: float = 0.0) -> None:
    """Divide ``prev``'s output channels by ``s`` and multiply the input columns of ``linears`` by ``s``.

    Args:
        prev: a norm module (1-D ``weight``, optional ``bias``) or an ``nn.Linear``.
        linears: consumers, each ``[out, len(s)]``.
        s: ``[in]`` positive scales.
        norm_offset: 0.0, or 1.0 for norms computing ``x̂ · (1 + w)``.
    """
    for lin in linears:
        _check_scales(s, lin.in_features, f"fold into {type(lin).__name__}")
    s64 = s.detach().double()
    if isinstance(prev, nn.Linear):
        n = s.numel()
        if prev.out_features < n:
            raise ValueError(f"previous linear has {prev.out_features} outputs, fewer than {n} scales")
        w = prev.weight
        w[-n:].copy_((w[-n:].double() / s64.to(w.device).unsqueeze(1)).to(w.dtype))
        if prev.bias is not None:
            b = prev.bias
            b[-n:].copy_((b[-n:].double() / s64.to(b.device)).to(b.dtype))
    else:
        weight = getattr(prev, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 1:
            raise ValueError(f"cannot fold scales into {type(prev).__name__}: it has no 1-D weight")
        _check_scales(s, weight.numel(), f"fold into {type(prev).__name__}")
        sd = s64.to(weight.device)
        weight.copy_(((norm_offset + weight.double()) / sd - norm_offset).to(weight.dtype))
        bias = getattr(prev, "bias", None)
        if isinstance(bias, Tensor):
            bias.copy_((bias.double() / sd).to(bias.dtype))
    for lin in linears:
        w = lin.weight
        w.copy_((w.double() * s64.to(w.device).unsqueeze(0)).to(w.dtype))


@torch.no_grad()
def apply_clip(linear: nn.Linear, min_val: Tensor, max_val: Tensor) -> None:
    """Clamp each (output row, input group) of ``linear.weight`` to ``[min_val, max_val]``.

    Args: ``min_val``/``max_val`` ``[out, n_groups]``; the group size is ``in // n_groups``.
    """
    out_f, in_f = linear.weight.shape
    if min_val.shape != max_val.shape or min_val.dim() != 2 or min_val.shape[0] != out_f:
        raise ValueError(f"clip bounds {tuple(min_val.shape)}/{tuple(max_val.shape)} do not fit weight {(out_f, in_f)}")
    n_groups = min_val.shape[1]
    if in_f % n_groups:
        raise ValueError(f"{n_groups} groups do not divide in_features={in_f}")
    w = linear.weight
    wg = w.float().reshape(out_f, n_groups, in_f // n_groups)
    lo = min_val.to(w.device, torch.float32).unsqueeze(-1)
    hi = max_val.to(w.device, torch.float32).unsqueeze(-1)
    w.copy_(torch.clamp(wg, lo, hi).reshape(out_f, in_f).to(w.dtype))
