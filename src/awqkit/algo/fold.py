"""Apply searched results to float weights: fold scales, clamp clipped groups. In place, no grad.

Folding is an equivalence transform: for ``y = W (prev(x))`` with ``prev`` a norm or a linear,
dividing prev's output channels by ``s`` and multiplying the columns of every consumer ``W`` by ``s``
leaves ``y`` unchanged in exact arithmetic.

* norm ``x̂ · (offset + w) (+ b)``: ``w ← (offset + w) / s − offset``, ``b ← b / s``
  (offset 0 for Llama-style RMSNorm/LayerNorm, 1 for Gemma's ``(1 + w)``).
* linear: the last ``len(s)`` output rows and bias entries are divided by ``s`` (a fused qkv
  projection feeding only its v part would scale only those rows).
* consumers: ``W[:, j] ← W[:, j] · s_j``.
* grouped-query attention (``heads=(head_dim, n_rep)``): v's output has ``n_kv`` heads, o's input
  ``n_kv · n_rep`` heads where query head ``h`` reads kv head ``h // n_rep``; v's rows are divided by
  ``s`` and o's columns multiplied by :func:`expand_heads` ``(s)``, which repeats each head block.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _check_scales(s: Tensor, n: int, where: str) -> None:
    if s.dim() != 1 or s.numel() != n:
        raise ValueError(f"{where}: scales must be 1-D of size {n}, got {tuple(s.shape)}")
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError(f"{where}: scales must be finite and positive")


def expand_heads(s: Tensor, head_dim: int, n_rep: int) -> Tensor:
    """``[n_kv · head_dim]`` → ``[n_kv · n_rep · head_dim]``: each head's block repeated ``n_rep`` times,
    in the order of transformers' ``repeat_kv`` (kv head ``k`` serves query heads ``k·n_rep .. k·n_rep+n_rep-1``)."""
    if s.dim() != 1 or s.numel() % head_dim:
        raise ValueError(f"expand_heads: {tuple(s.shape)} is not a whole number of {head_dim}-wide heads")
    return s.reshape(-1, 1, head_dim).expand(-1, n_rep, head_dim).reshape(-1)


def reduce_heads(x: Tensor, head_dim: int, n_rep: int) -> Tensor:
    """Inverse direction of :func:`expand_heads` for statistics: mean over the ``n_rep`` copies of each
    kv channel, ``[n_kv · n_rep · head_dim]`` → ``[n_kv · head_dim]``."""
    if x.dim() != 1 or x.numel() % (head_dim * n_rep):
        raise ValueError(f"reduce_heads: {tuple(x.shape)} is not a whole number of {n_rep} x {head_dim} blocks")
    return x.reshape(-1, n_rep, head_dim).mean(dim=1).reshape(-1)


@torch.no_grad()
def fold_scales(
    prev: nn.Module, linears: list[nn.Linear], s: Tensor, norm_offset: float = 0.0, heads: tuple[int, int] | None = None
) -> None:
    """Divide ``prev``'s output channels by ``s`` and multiply the input columns of ``linears`` by ``s``.

    Args:
        prev: a norm module (1-D ``weight``, optional ``bias``) or an ``nn.Linear``.
        linears: consumers, each ``[out, len(s)]``.
        s: ``[in]`` positive scales.
        norm_offset: 0.0, or 1.0 for norms computing ``x̂ · (1 + w)``.
        heads: ``(head_dim, n_rep)``: ``s`` is in prev's (kv) channel space and the consumers get
            ``expand_heads(s)`` (grouped-query v → o).
    """
    s_in = expand_heads(s, *heads) if heads is not None else s
    for lin in linears:
        _check_scales(s_in, lin.in_features, f"fold into {type(lin).__name__}")
    s64 = s.detach().double()
    s_in64 = s_in.detach().double()
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
        w.copy_((w.double() * s_in64.to(w.device).unsqueeze(0)).to(w.dtype))


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
