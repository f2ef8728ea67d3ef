"""AdaRound for one linear (Nagel et al., ICML 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Round-to-nearest (RTN) rounds every weight on its own. AdaRound keeps awqkit's grid (the scales and zeros of
:func:`awqkit.quant.primitives.compute_qparams`, unchanged) and only chooses, per weight, whether to round down or
up, so that the rounding errors of a row cancel on the layer's inputs instead of adding up.

Objective. For ``y = x Wᵀ`` and calibration tokens ``X`` ``[n, in]``, the output error of a quantized weight ``Ŵ`` is::

    ||X (W − Ŵ)ᵀ||²_F = tr(ΔW H ΔWᵀ),      ΔW = W − Ŵ,   H = XᵀX  [in, in]

so the inputs enter only through their Gram matrix ``H`` (which the pipeline already accumulates): training costs
the same for 1k or 1M calibration tokens. Every row of ``W`` has its own term ``ΔW_o H ΔW_oᵀ``.

Relaxation (the paper's). Per weight, ``f = floor(w / s)`` and a continuous variable ``V``::

    h(V) = clamp(sigmoid(V) · (ζ − γ) + γ, 0, 1),     ζ = 1.1, γ = −0.1       (rectified sigmoid)
    W̃    = s · (clamp(f + h(V) + z, 0, 2^bits − 1) − z)                      (soft weight, per group)

``V`` starts where ``h(V) = w/s − f`` (the fractional part), i.e. training starts at the continuous weight. The
stretch beyond [0, 1] lets ``h`` reach exactly 0 or 1 in finite ``V``, where its gradient vanishes. The loss is::

    L(V) = Σ_o ΔW̃_o H ΔW̃_oᵀ / D_o  +  reg_weight · Σ (1 − |2 h(V) − 1|^β)

Normalisation ``D_o = Σ_k s_o,k² H_kk`` (``trace(H)`` weighted by row ``o``'s squared grid steps; 12 × the row's
RTN error if its rounding errors were independent and uniform). It makes the objective unit-free (invariant to
rescaling ``W`` or ``X`` and to the token count: ``H`` may be a sum or a mean) and gives every row the same balance
between reconstruction and regulariser. Rows are independent problems but their steps differ by orders of
magnitude in an LLM; with one global normaliser (the paper's MSE, i.e. the token count) the regulariser alone
would round small-step rows and would never push large-step rows to 0 / 1. ``reg_weight`` = 0.01 (AIMET's and
BRECQ's value) on this scale is robust: on correlated Gram matrices (400-500 iterations) the final error
moved by ~3 % for an effective per-weight weight ``reg_weight · in`` from 0.3 to 150 (in = 128 .. 4096; 0.01 · in
is 1.3 .. 143 for in = 128 .. 14336), but was 17-36 % worse at 0.06-0.1: the regulariser then is too weak to push
``h`` to 0 / 1, rows end near their continuous weight and round almost like RTN.

Annealing. No regulariser for the first ``warmup`` fraction of the iterations; then ``β`` falls linearly from
``beta_range[0]`` (20: the regulariser only acts on ``h`` near 0.5, the rest stay free to move) to
``beta_range[1]`` (2: every ``h`` not at 0 or 1 is pushed there), as in the paper. The reconstruction target is
the *unclipped* ``W`` (the layer's real output, as :func:`awqkit.algo.clip_search.search_clip` scores it): with
``max_abs`` the warm-up starts compensating the clipping error; without, ``W̃ = W`` at the start (to float
rounding) and the warm-up only lets Adam, which normalises even tiny gradients, drift ``V`` along the flat
directions of ``H``: harmless (on 64 × 576 layers the final error was within 1 % of ``warmup=0``, and skipping
those iterations was 1 % worse).

Optimiser: Adam on ``V`` only, full batch (``H`` is the whole data set), no randomness at all (``seed`` is
accepted for API stability and unused): two calls with the same arguments are bit-identical on one device.
Gradients are computed in closed form (``∂/∂W̃ = −2 ΔW̃ H``; tests check them against autograd): per iteration
one ``[out, in] × [in, in]`` matmul, ``2 · out · in²`` flops, plus elementwise work; memory is about a dozen
``[out, in]`` float32 buffers at the peak (``W``, ``f + z``, ``V``, Adam's two moments, the gradient and the
temporaries of one step) and two ``[in, in]`` (``H`` in float32 and its symmetric part).

End: hard rounding ``q = clamp(f + z + [h(V) ≥ 0.5], 0, 2^bits − 1)`` (``h ≥ 0.5`` ⇔ ``V ≥ 0``), scored on the
exact objective. Rows are independent, so each row keeps AdaRound's rounding only where it beats RTN's: the
result is never worse than RTN on ``H``, row by row, and RTN exactly when no row improves.

Defaults: ``iters=1000``, ``lr=1e-2`` (the paper trains 10k steps at Adam's default lr 1e-3, BRECQ 20k; here ``V``
starts in [−2.4, 2.4] and ``h`` saturates beyond ±2.4, which takes a few hundred steps of 1e-2: 99 % of ``h`` end at
exactly 0 or 1 after 1000, 83 % after 400). On a 576 × 1536 layer with a correlated Gram matrix (4 bits, g = 128)
the error ratio to RTN was 0.461 / 0.393 / 0.380 / 0.375 after 200 / 500 / 1000 / 2000 steps (3 bits: the same to
±0.003). ``reg_weight=0.01``, ``beta_range=(20, 2)``, ``warmup=0.2``: AIMET's and BRECQ's values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from awqkit.quant.primitives import compute_qparams, dequantize, quantize, resolve_group_size

ZETA = 1.1
GAMMA = -0.1


@dataclass(frozen=True)
class AdaRoundResult:
    q: Tensor  # int32 [out, in] in [0, 2^bits - 1]: clamp(floor(w/s) + z (+1), 0, 2^bits - 1), w the clipped weight
    scales: Tensor  # float32 [out, n_groups]: compute_qparams of the (clipped) weight, unchanged
    zeros: Tensor  # int32 [out, n_groups]
    weight: Tensor  # float32 [out, in] = dequantize(q, scales, zeros, group_size)
    loss_rtn: float  # tr(ΔW H ΔWᵀ) of RTN on the same grid (ΔW against the unclipped weight)
    loss: float  # the same for the result, <= loss_rtn
    iters: int  # Adam steps run (0: iters=0, or RTN's error was already 0)


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V) = clamp(sigmoid(V) · (ζ − γ) + γ, 0, 1)`` with ζ = 1.1, γ = −0.1 (elementwise, any shape)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def rectified_sigmoid_inverse(h: Tensor) -> Tensor:
    """``V`` with ``rectified_sigmoid(V) = h`` for ``h`` in ``[0, 1]``; finite (|V| <= 2.4) thanks to the stretch."""
    p = (h.float().clamp(0.0, 1.0) - GAMMA) / (ZETA - GAMMA)
    return torch.log(p) - torch.log1p(-p)


def beta_at(step: int, iters: int, warmup: float, beta_range: tuple[float, float]) -> float | None:
    """β of the regulariser at 0-based ``step``: None during warm-up, then linear from ``beta_range[0]`` to ``[1]``."""
    start = int(warmup * iters)
    if step < start:
        return None
    t = (step - start) / max(1, iters - start)
    return beta_range[1] + (beta_range[0] - beta_range[1]) * (1.0 - t)


def _row_errors(dw: Tensor, h: Tensor) -> Tensor:
    """``ΔW_o H ΔW_oᵀ`` per row, float64 ``[out]`` (``dw`` ``[out, in]``, ``h`` ``[in, in]`` symmetric)."""
    return ((dw @ h) * dw).double().sum(dim=1)


def _check(
    w: Tensor,
    h: Tensor,
    bits: int,
    group_size: int,
    iters: int,
    lr: float,
    reg_weight: float,
    beta_range: tuple[float, float],
    warmup: float,
    max_abs: Tensor | None,
) -> int:
    """Validate the arguments of :func:`adaround`; returns the concrete group size."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"adaround: w must be a 2-D floating weight [out, in], got {w.dtype} {tuple(w.shape)}")
    out_f, in_f = w.shape
    if h.dim() != 2 or h.shape != (in_f, in_f):
        raise ValueError(
            f"adaround: h must be the input's Gram matrix [in, in] = {(in_f, in_f)} for w {tuple(w.shape)}, "
            f"got {tuple(h.shape)}"
        )
    if not 2 <= bits <= 8:
        raise ValueError(f"adaround: bits={bits} is not supported; use 2..8")
    if group_size == 0 or group_size < -1:
        raise ValueError(f"adaround: group_size must be positive or -1 (whole row), got {group_size}")
    try:
        g = resolve_group_size(in_f, group_size)
    except ValueError as e:
        raise ValueError(f"adaround: group_size {group_size} does not divide in={in_f}: {e}") from None
    if not torch.isfinite(w).all():
        raise ValueError("adaround: w has non-finite values (nan/inf); fix the weight before quantizing it")
    if not torch.isfinite(h).all():
        raise ValueError("adaround: h has non-finite values (nan/inf); accumulate the Gram matrix in float64")
    if (torch.diagonal(h) < 0).any():
        raise ValueError("adaround: h has a negative diagonal entry; it must be a Gram matrix XᵀX (PSD)")
    if max_abs is not None:
        if max_abs.shape != (out_f, in_f // g):
            raise ValueError(
                f"adaround: max_abs must be [out, n_groups] = {(out_f, in_f // g)} for w {tuple(w.shape)} "
                f"and group_size {group_size}, got {tuple(max_abs.shape)}"
            )
        if not torch.isfinite(max_abs).all() or (max_abs < 0).any():
            raise ValueError("adaround: max_abs must be finite and >= 0 (a clip bound |w| <= max_abs per group)")
    if iters < 0:
        raise ValueError(f"adaround: iters must be >= 0 (0 returns RTN), got {iters}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"adaround: lr must be a positive finite number, got {lr}")
    if not (math.isfinite(reg_weight) and reg_weight >= 0):
        raise ValueError(f"adaround: reg_weight must be finite and >= 0, got {reg_weight}")
    if len(beta_range) != 2 or not all(math.isfinite(b) and b >= 1 for b in beta_range):
        raise ValueError(f"adaround: beta_range must be two finite numbers >= 1 (start, end), got {beta_range}")
    if not (0 <= warmup < 1):
        raise ValueError(f"adaround: warmup is a fraction of iters in [0, 1), got {warmup}")
    return g


def adaround(
    w: Tensor,
    h: Tensor,
    bits: int,
    group_size: int,
    zero_point: bool = True,
    *,
    iters: int = 1000,
    lr: float = 1e-2,
    reg_weight: float = 0.01,
    beta_range: tuple[float, float] = (20.0, 2.0),
    warmup: float = 0.2,
    max_abs: Tensor | None = None,
    scale_dtype: torch.dtype | None = torch.float16,
    seed: int = 0,
    grid_weight: Tensor | None = None,
) -> AdaRoundResult:
    """AdaRound rounding of ``w`` ``[out, in]`` on awqkit's group-wise grid, trained on the Gram matrix ``h``.

    Args:
        w: ``[out, in]`` float weight (not modified). Computation is float32 on ``w``'s device.
        h: ``[in, in]`` Gram matrix ``XᵀX`` of the linear's input (any float dtype/device; moved to ``w``'s).
        bits: 2..8. group_size: divides ``in``, or -1 for one group per row. zero_point: asymmetric grid (True)
            or symmetric. scale_dtype: as in :func:`awqkit.quant.primitives.compute_qparams`.
        iters: Adam steps (0 returns RTN, bit-identical to ``quantize_weight``). lr: Adam's step size on ``V``.
        reg_weight: regulariser weight per weight, against the reconstruction error normalised by
            ``D_o = Σ_k s_o,k² H_kk`` per row (module docstring).
        beta_range: (start, end) of β, annealed linearly after warm-up. warmup: fraction of ``iters`` without
            regulariser.
        max_abs: optional clip bound ``[out, n_groups]``: the grid and the rounding use
            ``clamp(w, -max_abs, max_abs)`` per group; the error is measured against the unclipped ``w``.
        grid_weight: instead of ``max_abs``, the clipped weight itself (awqkit's clip search clamps to
            per-group ``[min, max]``, :func:`awqkit.algo.fold.apply_clip`): grid and rounding use it, the error is
            measured against ``w``.
        seed: unused (the method has no randomness); kept for API stability.
    Returns:
        :class:`AdaRoundResult`; ``loss <= loss_rtn`` always.
    """
    del seed  # deterministic: V starts at the fractional part and training is full batch
    return _adaround(
        w, h, bits, group_size, zero_point, iters, lr, reg_weight, beta_range, warmup, max_abs, scale_dtype, grid_weight
    )[0]


def _grad_v(
    v: Tensor,
    base: Tensor,
    target: Tensor,
    hf: Tensor,
    s3: Tensor,
    z3: Tensor,
    norm: Tensor,
    max_q: int,
    beta: float | None,
    reg_weight: float,
) -> Tensor:
    """∂L/∂V of the module docstring's loss, in closed form.

    ``v``/``target`` ``[out, in]``; ``base`` = f + z, ``[out, G, g]``; ``hf`` symmetric ``[in, in]``; ``s3``/``z3``
    ``[out, G, 1]``; ``norm`` = D_o ``[out, 1, 1]``; ``beta`` None: no regulariser (warm-up).
    """
    out_f, in_f = v.shape
    sig = torch.sigmoid(v)
    hraw = sig * (ZETA - GAMMA) + GAMMA
    hv = hraw.clamp(0.0, 1.0)
    qs = base + hv.reshape(base.shape)  # f + h + z, clamped to the grid below
    dw = target - ((qs.clamp(0, max_q) - z3) * s3).reshape(out_f, in_f)
    # ∂(ΔW H ΔWᵀ / D)/∂h = −2 (ΔW H) s / D, where the grid clamp passes the gradient
    grad = (dw @ hf).reshape(base.shape).mul_(s3 * (-2.0) / norm).mul_((qs >= 0) & (qs <= max_q)).reshape(out_f, in_f)
    del qs, dw
    if beta is not None and reg_weight > 0:
        u = hv.mul_(2.0).sub_(1.0)  # ∂/∂h of reg · (1 − |u|^β), u = 2h − 1: −2 reg β |u|^(β−1) sign(u)
        grad.add_(u.abs().pow_(beta - 1.0).mul_(torch.sign(u)), alpha=-2.0 * reg_weight * beta)
    # through the rectified sigmoid: (ζ − γ) σ (1 − σ) where it is not clamped
    return grad.mul_(sig.mul_(1.0 - sig).mul_(ZETA - GAMMA)).mul_((hraw >= 0) & (hraw <= 1))


def _adaround(
    w: Tensor,
    h: Tensor,
    bits: int,
    group_size: int,
    zero_point: bool,
    iters: int,
    lr: float,
    reg_weight: float,
    beta_range: tuple[float, float],
    warmup: float,
    max_abs: Tensor | None,
    scale_dtype: torch.dtype | None,
    grid_weight: Tensor | None = None,
) -> tuple[AdaRoundResult, Tensor | None]:
    """:func:`adaround`, plus the trained ``V`` ``[out, in]`` (None when no training ran) for the tests."""
    g = _check(w, h, bits, group_size, iters, lr, reg_weight, beta_range, warmup, max_abs)
    out_f, in_f = w.shape
    n_groups = in_f // g
    max_q = 2**bits - 1
    dev = w.device

    target = w.detach().float()
    wc = target
    if max_abs is not None:  # clip application as in awqkit (clamp per (row, group)), bounds (-max_abs, max_abs)
        m = max_abs.to(dev, torch.float32).unsqueeze(-1)
        wc = torch.clamp(target.reshape(out_f, n_groups, g), -m, m).reshape(out_f, in_f)
    if grid_weight is not None:
        if grid_weight.shape != w.shape:
            raise ValueError(f"adaround: grid_weight {tuple(grid_weight.shape)} must have w's shape {tuple(w.shape)}")
        wc = grid_weight.detach().to(dev, torch.float32)
    scales, zeros = compute_qparams(wc, bits, group_size, zero_point, scale_dtype)
    q_rtn = quantize(wc, scales, zeros, bits, group_size)
    hf = h.detach().to(dev, torch.float32)
    hf = (hf + hf.T) * 0.5  # the loss only sees the symmetric part; makes ∂/∂W̃ = −2 ΔW H exact
    rows_rtn = _row_errors(target - dequantize(q_rtn, scales, zeros, group_size), hf)
    loss_rtn = rows_rtn.sum().item()

    def result(q: Tensor, loss: float, n: int) -> AdaRoundResult:
        return AdaRoundResult(q, scales, zeros, dequantize(q, scales, zeros, group_size), loss_rtn, loss, n)

    if iters == 0 or loss_rtn == 0.0:
        return result(q_rtn, loss_rtn, 0), None

    s3 = scales.unsqueeze(-1)  # [out, G, 1]
    z3 = zeros.float().unsqueeze(-1)
    wcg = wc.reshape(out_f, n_groups, g)
    base = torch.floor(wcg / s3)  # f, from the same division as quantize()
    v = rectified_sigmoid_inverse(wcg / s3 - base).reshape(out_f, in_f)  # h(V) = fractional part
    base.add_(z3)  # f + z from here on
    # D_o = Σ_k s_o,k² H_kk (module docstring)
    diag = torch.diagonal(hf).reshape(n_groups, g).sum(dim=1)  # [G]
    norm = (scales.pow(2) @ diag).clamp(min=torch.finfo(torch.float32).tiny).reshape(out_f, 1, 1)

    opt = torch.optim.Adam([v], lr=lr)
    for step in range(iters):
        beta = beta_at(step, iters, warmup, beta_range)
        v.grad = _grad_v(v, base, target, hf, s3, z3, norm, max_q, beta, reg_weight)
        opt.step()
    v.grad = None

    up = (rectified_sigmoid(v) >= 0.5).reshape(out_f, n_groups, g)
    q_ada = (base + up).clamp(0, max_q).reshape(out_f, in_f).to(torch.int32)
    rows_ada = _row_errors(target - dequantize(q_ada, scales, zeros, group_size), hf)
    better = rows_ada < rows_rtn  # rows are independent problems: keep AdaRound's rounding where it wins
    if not better.any():
        return result(q_rtn, loss_rtn, iters), v
    q = torch.where(better.unsqueeze(-1), q_ada, q_rtn)
    return result(q, torch.where(better, rows_ada, rows_rtn).sum().item(), iters), v
