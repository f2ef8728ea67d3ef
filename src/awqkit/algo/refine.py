"""Learned rounding and clipping for block-wise refinement (SignRound, Cheng et al. 2023; as in AutoRound).

A linear's weight ``w`` ``[out, in]`` (scaled by AWQ, *not* clipped) is quantized on a grid whose range starts at
AWQ's clipped range ``[wmin, wmax]`` per (row, group) and whose integers start at round-to-nearest. Three tensors
are learned, by signed gradient descent on a block's output error (:func:`signed_descent`):

* ``v`` ``[out, in]`` in ``[-0.5, 0.5]``: added before rounding, ``q = clamp(round(w / s + v) + z, 0, 2^b - 1)``,
  so each integer stays within one step of round-to-nearest of ``w`` on the same grid;
* ``lo``, ``hi`` ``[out, n_groups]`` in ``[MIN_RANGE, MAX_RANGE]``: multipliers of ``wmin`` and ``wmax``
  (asymmetric: ``s = (hi·wmax - lo·wmin) / (2^b - 1)``, ``z = clamp(round(-lo·wmin / s), 0, 2^b - 1)``;
  symmetric: ``s = hi·max|w| / (2^(b-1) - 1)``, ``z = 2^(b-1)``, ``lo`` unused).

Rounding uses the straight-through estimator; scales are rounded to fp16 in the forward pass (straight through),
so :meth:`LearnedGrid.integers` gives exactly the integers, scales and zeros whose dequantization the forward
pass used. With ``v = 0`` and ``lo = hi = 1`` the grid is that of :func:`awqkit.quant.primitives.compute_qparams`
on the clipped weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from awqkit.quant.primitives import group_view

MIN_RANGE = 0.5  # the learned range multipliers stay in [MIN_RANGE, MAX_RANGE] of AWQ's clipped range
MAX_RANGE = 1.5


def _round_ste(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def _fp16_ste(x: Tensor) -> Tensor:
    return x + (x.half().float() - x).detach()


class LearnedGrid:
    """One linear's learnable quantizer (see the module docstring).

    Args:
        w: ``[out, in]`` float weight to quantize (the target: AWQ-scaled, before clipping).
        clipped: ``[out, in]`` the same weight after AWQ's clipping; its per-group range starts the grid.
        bits: 2..8. group_size: divides ``in``. zero_point: asymmetric (True) or symmetric.
    """

    def __init__(self, w: Tensor, clipped: Tensor, bits: int, group_size: int, zero_point: bool) -> None:
        if w.shape != clipped.shape:
            raise ValueError(f"weight {tuple(w.shape)} and clipped weight {tuple(clipped.shape)} differ in shape")
        self.bits, self.zero_point = bits, zero_point
        self.wg = group_view(w, group_size).detach().clone()  # [out, n_groups, g]
        cg = group_view(clipped, group_size)
        self.g = self.wg.shape[-1]
        if zero_point:
            self.wmax, self.wmin = cg.amax(dim=-1).detach(), cg.amin(dim=-1).detach()
        else:
            self.wmax, self.wmin = cg.abs().amax(dim=-1).detach(), torch.zeros_like(cg[..., 0])
        self.v = torch.zeros_like(self.wg, requires_grad=True)
        self.lo = torch.ones_like(self.wmax, requires_grad=True)
        self.hi = torch.ones_like(self.wmax, requires_grad=True)

    @property
    def params(self) -> list[Tensor]:
        return [self.v, self.lo, self.hi] if self.zero_point else [self.v, self.hi]

    def _grid(self) -> tuple[Tensor, Tensor]:
        """``(s, z)`` ``[out, n_groups, 1]`` float32, differentiable in ``lo`` and ``hi``."""
        if self.zero_point:
            max_int = 2**self.bits - 1
            hi, lo = self.wmax * self.hi, self.wmin * self.lo
            s = _fp16_ste((hi - lo).clamp(min=1e-5) / max_int)
            z = _round_ste(-lo / s).clamp(0, max_int)
        else:
            half = 2 ** (self.bits - 1)
            s = _fp16_ste((self.wmax * self.hi).clamp(min=1e-5) / (half - 1))
            z = torch.full_like(s, float(half))
        return s.unsqueeze(-1), z.unsqueeze(-1)

    def weight(self) -> Tensor:
        """The dequantized weight ``[out, in]`` float32 (differentiable in ``v``, ``lo``, ``hi``)."""
        s, z = self._grid()
        q = (_round_ste(self.wg / s + self.v) + z).clamp(0, 2**self.bits - 1)
        deq = (q - z) * s
        return deq.reshape(self.wg.shape[0], -1)

    @torch.no_grad()
    def integers(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(q uint8 [out, in], scales float32 [out, n_groups], zeros int32 [out, n_groups])``: what the forward
        pass dequantized, for the packer."""
        s, z = self._grid()
        q = (torch.round(self.wg / s + self.v) + z).clamp(0, 2**self.bits - 1)
        return q.reshape(self.wg.shape[0], -1).to(torch.uint8), s.squeeze(-1), z.squeeze(-1).to(torch.int32)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project the parameters back into their ranges after a step."""
        self.v.clamp_(-0.5, 0.5)
        self.lo.clamp_(MIN_RANGE, MAX_RANGE)
        self.hi.clamp_(MIN_RANGE, MAX_RANGE)


class LearnedNorm:
    """A norm's weight learned with the grids (norm tweaking): ``weight = (offset + w) · (1 + r·u) - offset`` with
    ``u`` ``[channels]`` in ``[-1, 1]``, starting at 0, so each channel's scale ``offset + w`` moves within
    ``[1 - r, 1 + r]`` of its start (``offset``: 0 for ``x̂ · w`` norms, 1 for Gemma's ``x̂ · (1 + w)``).

    Args:
        w: ``[channels]`` the norm's weight (after AWQ's folding). max_change: ``r`` in (0, 1).
        norm_offset: 0.0 or 1.0.
    """

    def __init__(self, w: Tensor, max_change: float, norm_offset: float = 0.0) -> None:
        if w.dim() != 1:
            raise ValueError(f"a norm weight is one-dimensional, got shape {tuple(w.shape)}")
        if not 0.0 < max_change < 1.0:
            raise ValueError(f"max_change={max_change} must be in (0, 1)")
        self.base = (w.detach().float() + norm_offset).clone()
        self.offset, self.r = norm_offset, max_change
        self.u = torch.zeros_like(self.base, requires_grad=True)

    @property
    def params(self) -> list[Tensor]:
        return [self.u]

    def weight(self) -> Tensor:
        """The norm's weight ``[channels]`` float32 (differentiable in ``u``)."""
        return self.base * (1.0 + self.r * self.u) - self.offset

    @torch.no_grad()
    def clamp_(self) -> None:
        self.u.clamp_(-1.0, 1.0)


class Learnable(Protocol):
    """What :func:`signed_descent` trains: parameters and their projection back into range."""

    @property
    def params(self) -> list[Tensor]: ...

    def clamp_(self) -> None: ...


def signed_descent(
    grids: Sequence[Learnable],
    loss: Callable[[int], Tensor],
    iters: int,
    lr: float,
    n_batches: int,
    *,
    seed: int = 0,
    reduce_grads: Callable[[Tensor], Tensor] | None = None,
) -> list[float]:
    """Signed gradient descent (SignRound) on the grids' parameters.

    Objective: ``loss(j)``, the block's output error on calibration batch ``j`` (a differentiable scalar), one
    batch per step, in a seeded random order that visits every batch once per epoch. Step ``t`` moves each
    parameter by ``lr · (1 - t / iters)`` against the sign of its gradient (summed over data-parallel ranks by
    ``reduce_grads``), then projects it back into range. The steps sum to ``lr · iters / 2``: with
    ``lr = 1 / iters`` a rounding offset can travel half of its range ``[-0.5, 0.5]`` whatever ``iters``.

    Returns the loss of every step (before its update)."""
    if iters < 0 or lr <= 0 or n_batches < 1:
        raise ValueError(f"iters={iters} must be >= 0, lr={lr} > 0 and n_batches={n_batches} >= 1")
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    params = [p for g in grids for p in g.params]
    history = []
    for t in range(iters):
        if not order:
            order = torch.randperm(n_batches, generator=gen).tolist()
        value = loss(order.pop())
        grads = torch.autograd.grad(value, params, allow_unused=True)
        history.append(float(value.detach()))
        step = lr * (1.0 - t / iters)
        with torch.no_grad():
            for p, gr in zip(params, grads, strict=True):
                if gr is None:
                    continue
                if reduce_grads is not None:
                    gr = reduce_grads(gr)
                p.sub_(step * gr.sign())
        for g in grids:
            g.clamp_()
    return history


__all__ = ["MAX_RANGE", "MIN_RANGE", "Learnable", "LearnedGrid", "LearnedNorm", "signed_descent"]
