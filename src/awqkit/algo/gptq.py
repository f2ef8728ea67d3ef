"""GPTQ for one linear (Frantar et al., ICLR 2023, Algorithm 1), on awqkit's static group-wise grid.

Objective, for a linear ``W`` ``[out, in]`` and its calibration inputs ``X`` ``[n, in]``::

    min_Ŵ || X Wᵀ − X Ŵᵀ ||²_F  =  Σ_rows (w − ŵ)ᵀ H (w − ŵ),      H = Xᵀ X  (``[in, in]``, summed over tokens)

with every ``Ŵ[:, j]`` on the quantization grid of its group. The rows are independent and share ``H``, so
the columns are quantized one at a time, in the same order for every row: when column ``j`` is rounded, its
error is spread over the columns not yet quantized with the Optimal Brain Surgeon update that keeps the output
optimal given the columns fixed so far::

    err    = (w_j − ŵ_j) / U[j, j]
    w_{>j} −= err · U[j, >j]                      U = upper Cholesky factor of H⁻¹ (U[j, >j] / U[j, j] is the
                                                  OBS direction H_F⁻¹[j, >j] / H_F⁻¹[j, j] on the remaining set F)

and rounding column ``j`` costs ``(w_j − ŵ_j)² / H_F⁻¹[j, j] = err²`` per row, so the total of the returned
``loss`` is the output error ``Σ_rows (w − ŵ)ᵀ H' (w − ŵ)`` under the dampened ``H'`` (the paper's proxy;
with ``H`` summed over tokens it is a sum of squared output errors, not a mean; the paper's factor 2 in
``H = 2XXᵀ`` only rescales ``H``, which changes nothing above).

Lazy batch updates (the paper's §"Lazy Batch-Updates"): columns are taken ``block_size`` at a time; inside a
block each column is quantized and the block's own later columns updated (a rank-1 update), and the block's
errors ``E`` ``[out, B]`` update every column after the block at once, ``W[:, after] −= E · U[block, after]``.

Grid (static groups): the scales and zeros of every group are computed ONCE, with
:func:`awqkit.quant.primitives.compute_qparams`, from the (clipped) weight as given, before any column is
updated. So the result is exactly awqkit's group-wise format (``q``, fp16-rounded ``scales``, int ``zeros``,
what the AutoAWQ GEMM packer needs) whatever the column order, and ``weight`` equals
``dequantize(q, scales, zeros, group_size)`` bit for bit. GPTQ only chooses the integers.

Choices:

* Dampening ``H' = H + damp · mean(diag H) · I``; if a Cholesky factorisation fails the damping is multiplied
  by 10 up to :data:`_DAMP_RETRIES` times (a warning is logged), then a ``ValueError``.
* Dead inputs (``H[i, i] == 0``: the input is 0 on every calibration token): ``H[i, i]`` is set to 1 so that
  ``H`` is invertible. The weight column is NOT zeroed (the paper's reference code zeroes it): the grid comes
  from the unmodified weight and the column, decoupled from the others because row and column ``i`` of ``H``
  are 0, is plain round-to-nearest. That is what RTN would give for an input the calibration never exercised,
  instead of deleting the weight.
* ``act_order=True``: columns in order of decreasing ``diag(H)`` (stable sort; ties keep index order), each
  column still on the grid of its ORIGINAL group; ``q`` is returned in the original column order.
* ``max_abs`` (clip thresholds) shapes the grid only; GPTQ quantizes the unclipped weight on it, so the clipping
  error is compensated like rounding error (measured better than quantizing the clipped weight: see the argument).
* float32 everywhere (on ``w``'s device), the factorisations included: see :data:`_FACTOR_DTYPE`.

Cost: ``O(in³)`` for the factorisations, ``O(out · in²)`` for the lazy block updates (matmuls) and
``O(out · in · block_size)`` for the updates inside the blocks; ``in`` Python-level column steps. Memory:
``H`` and its factor (``2 · in²`` floats) and two ``[out, in]`` float32 buffers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from awqkit.quant.primitives import compute_qparams, dequantize

logger = logging.getLogger(__name__)

_DAMP_RETRIES = 3  # after the first failed factorisation: damp × 10, × 100, × 1000
# dtype of H, H⁻¹ and its Cholesky factor. float32: on LLM-like Grams (in = 576 and 1536, 1024-4096 tokens, low-rank
# activations with lognormal channel scales and 50x outlier channels, cond(H') up to ~1e5) a float64 factorisation
# changed the output error by at most 1e-4 relative (either sign) and < 0.3 % of the integers, at damp 0.01 and
# 0.001, and the float32 Cholesky never needed a retry; float64 is slow on most GPUs.
_FACTOR_DTYPE = torch.float32


@dataclass(frozen=True)
class GPTQResult:
    q: Tensor  # int32 [out, in], values in [0, 2^bits - 1]
    scales: Tensor  # float32 [out, n_groups] (fp16-representable values when scale_dtype=fp16)
    zeros: Tensor  # int32 [out, n_groups]
    weight: Tensor  # float32 [out, in] = dequantize(q, scales, zeros, group_size): the weight to run with
    loss: float  # the proxy loss: Σ over columns and rows of (w - ŵ)² / H_F⁻¹[j, j] (= err²), for logging
    # float32 [out, in]: each column as it was rounded, after the error feedback of the columns before it, so
    # q = clamp(round(updated / scale) + zero, 0, 2^bits - 1) (the starting point of awqkit.refine's init="gptq")
    updated: Tensor | None = None


def _check_inputs(
    w: Tensor,
    h: Tensor,
    bits: int,
    group_size: int,
    damp: float,
    block_size: int,
    max_abs: Tensor | None,
) -> int:
    """Validates the arguments of :func:`gptq_quantize`; returns the concrete group size."""
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        got = f"{tuple(w.shape)} {w.dtype}" if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"gptq_quantize: w must be a 2-D float weight [out, in], got {got}")
    out_f, in_f = w.shape
    if out_f == 0 or in_f == 0:
        raise ValueError(f"gptq_quantize: w {tuple(w.shape)} is empty")
    if not isinstance(h, Tensor) or h.dim() != 2 or h.shape[0] != h.shape[1]:
        got = str(tuple(h.shape)) if isinstance(h, Tensor) else type(h).__name__
        raise ValueError(f"gptq_quantize: h must be a square Gram matrix [in, in] = [{in_f}, {in_f}], got {got}")
    if h.shape[0] != in_f:
        raise ValueError(
            f"gptq_quantize: h {tuple(h.shape)} does not fit w {tuple(w.shape)}: expected [{in_f}, {in_f}] "
            "(the Gram matrix Xᵀ X of this linear's inputs)"
        )
    if not h.is_floating_point():
        raise ValueError(f"gptq_quantize: h must be a float tensor, got {h.dtype}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"gptq_quantize: bits={bits!r} is not supported; use an int in 2..8")
    g = in_f if group_size == -1 else group_size
    if isinstance(group_size, bool) or not isinstance(group_size, int) or g <= 0 or in_f % g != 0:
        raise ValueError(
            f"gptq_quantize: group_size={group_size!r} must divide in_features={in_f} (or be -1 for whole rows)"
        )
    if not (isinstance(damp, int | float) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"gptq_quantize: damp={damp!r} must be a finite number >= 0 (0.01 is the usual value)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"gptq_quantize: block_size={block_size!r} must be an int >= 1 (128 is the usual value)")
    if not torch.isfinite(w).all():
        raise ValueError(f"gptq_quantize: w {tuple(w.shape)} has non-finite values (NaN/inf); fix the checkpoint")
    if not torch.isfinite(h).all():
        raise ValueError(
            f"gptq_quantize: h {tuple(h.shape)} has non-finite values; accumulate the Gram in float32/float64 "
            "and check the calibration activations"
        )
    diag = h.diagonal()
    if (diag < 0).any():
        raise ValueError(
            f"gptq_quantize: h has {int((diag < 0).sum())} negative diagonal entries; it must be a Gram matrix "
            "Xᵀ X (symmetric positive semi-definite)"
        )
    asym = (h - h.T).abs().max().item()
    if asym > 1e-3 * max(diag.abs().max().item(), 1e-30):
        raise ValueError(
            f"gptq_quantize: h is not symmetric (max |h - hᵀ| = {asym:.3g}, max diag = {diag.max().item():.3g}); "
            "pass the Gram matrix Xᵀ X"
        )
    if max_abs is not None:
        n_groups = in_f // g
        if not isinstance(max_abs, Tensor) or tuple(max_abs.shape) != (out_f, n_groups):
            got = str(tuple(max_abs.shape)) if isinstance(max_abs, Tensor) else type(max_abs).__name__
            raise ValueError(
                f"gptq_quantize: max_abs {got} must be [out, n_groups] = [{out_f}, {n_groups}] "
                f"(w {tuple(w.shape)}, group_size={group_size})"
            )
        if not torch.isfinite(max_abs).all() or (max_abs < 0).any():
            raise ValueError("gptq_quantize: max_abs must be finite and >= 0 (clip thresholds |w| <= max_abs)")
    return g


def _inverse_cholesky(h: Tensor, damp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(h + d · mean(diag h) · I)⁻¹`` (``H⁻¹ = Uᵀ U``) and the ``d`` used.

    ``d`` starts at ``damp`` and is multiplied by 10 after a failed factorisation (from 1e-3 when ``damp`` is 0),
    at most :data:`_DAMP_RETRIES` times; then a ``ValueError``.
    """
    n = h.shape[0]
    mean_diag = h.diagonal().mean()
    tries = [damp] + [max(damp, 1e-4) * 10**k for k in range(1, _DAMP_RETRIES + 1)]
    for k, d in enumerate(tries):
        hd = h.clone()
        hd.diagonal().add_(d * mean_diag)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                if k:
                    logger.warning("gptq: H [%d, %d] was not positive definite at damp=%g; used damp=%g", n, n, damp, d)
                return u, d
    raise ValueError(
        f"gptq_quantize: the Hessian h [{n}, {n}] is not positive definite even with damp={tries[-1]:g} "
        f"(started at {damp:g}); collect more calibration tokens, pass a larger damp, or check h for corruption"
    )


@torch.no_grad()
def gptq_quantize(
    w: Tensor,
    h: Tensor,
    bits: int,
    group_size: int,
    zero_point: bool = True,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    max_abs: Tensor | None = None,
    scale_dtype: torch.dtype | None = torch.float16,
    grid_weight: Tensor | None = None,
) -> GPTQResult:
    """GPTQ-quantize ``w`` on awqkit's static group-wise grid (see the module docstring for the algorithm).

    Args:
        w: ``[out, in]`` weight, any float dtype; the math runs in float32 on ``w``'s device. Not modified.
        h: ``[in, in]`` Gram matrix ``Xᵀ X`` of the linear's inputs summed over calibration tokens (symmetric
            PSD, may be singular; any float dtype and device: it is copied to ``w``'s device in float32).
        bits: 2..8. group_size: divides ``in``, or -1 (one group per row).
        zero_point: asymmetric (True) or symmetric grid, as :func:`awqkit.quant.primitives.compute_qparams`.
        damp: ``H += damp · mean(diag H) · I`` (retried × 10 up to 3 times if ``H`` is still not PD).
        block_size: columns per lazy batch update (the result does not depend on it beyond float rounding).
        act_order: quantize columns in order of decreasing ``diag(H)``; every column keeps its own group's grid.
        grid_weight: the weight the grid is computed from instead of ``w`` (after ``max_abs``): the weight clipped
            by awqkit's clip search (:func:`awqkit.algo.fold.apply_clip`), while ``w`` is the unclipped target.
        max_abs: optional clip thresholds ``[out, n_groups]``: each group of ``w`` is clamped to
            ``[-max_abs, max_abs]`` exactly as :func:`awqkit.algo.fold.apply_clip` clamps to ``[min_val,
            max_val]`` (float32 clamp, stored back in ``w``'s dtype), and the grid is computed from the clamped
            weight. GPTQ then quantizes the UNclipped ``w`` on that grid: values beyond the range saturate at
            the ends of the grid and the clipping error is compensated by the later columns like any rounding
            error. (Quantizing the clamped weight instead leaves the clipping error uncompensated: on correlated
            inputs, 3-bit, thresholds 0.85 x max|w|, its output error was 1.2x this one's, 1.5x at 0.7 x.) With a
            ``w`` that is already clipped (the pipeline's ``apply_clip`` ran) both are the same.
        scale_dtype: the dtype scales are rounded to (fp16, as AutoAWQ stores them); None keeps float32.
    Returns:
        :class:`GPTQResult`: ``q`` int32 ``[out, in]``, ``scales`` float32 / ``zeros`` int32 ``[out, n_groups]``,
        ``weight`` float32 ``[out, in]`` (= ``dequantize(q, scales, zeros, group_size)``) and the proxy ``loss``.
    Raises:
        ValueError: bad shapes, dtypes or values (non-finite ``w``/``h``, negative ``diag h``, asymmetric ``h``,
        bits outside 2..8, a group size that does not divide ``in``), or an ``h`` that stays not positive
        definite after the damping retries.
    """
    g = _check_inputs(w, h, bits, group_size, damp, block_size, max_abs)
    out_f, in_f = w.shape
    n_groups = in_f // g
    dev = w.device
    max_int = 2**bits - 1

    wf = w.detach().to(torch.float32).clone()  # the working copy GPTQ updates: the weight as given, never clipped
    w_grid = wf
    if max_abs is not None:  # the same float ops as fold.apply_clip(min_val=-max_abs, max_val=max_abs)
        m = max_abs.to(dev, torch.float32).unsqueeze(-1)
        w_grid = torch.clamp(wf.reshape(out_f, n_groups, g), -m, m).reshape(out_f, in_f).to(w.dtype).float()
    if grid_weight is not None:  # e.g. the weight as awqkit's clip search clamped it; wf stays the unclipped target
        if grid_weight.shape != w.shape:
            raise ValueError(
                f"gptq_quantize: grid_weight {tuple(grid_weight.shape)} must have w's shape {tuple(w.shape)}"
            )
        w_grid = grid_weight.detach().to(dev, torch.float32)
    scales, zeros = compute_qparams(w_grid, bits, group_size, zero_point, scale_dtype)
    zeros_f = zeros.float()
    del w_grid

    hf = h.detach().to(dev, _FACTOR_DTYPE)
    hf = (hf + hf.T) / 2  # Cholesky reads one triangle only; the check above bounded the asymmetry
    dead = hf.diagonal() == 0
    hf.diagonal()[dead] = 1.0  # row and column of a dead input are 0: it decouples, and its column is plain RTN

    group_of = torch.arange(in_f, device=dev) // g  # original group of each column
    if act_order:
        perm = torch.argsort(hf.diagonal(), descending=True, stable=True)
        wf = wf[:, perm]
        hf = hf[perm][:, perm]
        group_of = group_of[perm]
    u, _ = _inverse_cholesky(hf, damp)
    u = u.to(torch.float32)
    del hf

    q = torch.empty(out_f, in_f, dtype=torch.float32, device=dev)
    loss = 0.0
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = wf[:, i1:i2]  # a view: updated in place
        u1 = u[i1:i2, i1:i2]
        s1 = scales.index_select(1, group_of[i1:i2])  # [out, B] each column's own (original) group grid
        z1 = zeros_f.index_select(1, group_of[i1:i2])
        err1 = torch.empty(out_f, i2 - i1, dtype=torch.float32, device=dev)
        for j in range(i2 - i1):
            col, s, z = w1[:, j], s1[:, j], z1[:, j]
            qc = torch.clamp(torch.round(col / s) + z, 0, max_int)  # the float ops of primitives.quantize
            q[:, i1 + j] = qc
            e = (col - (qc - z) * s) / u1[j, j]  # the float ops of primitives.dequantize, then the OBS scaling
            err1[:, j] = e
            if j + 1 < i2 - i1:
                w1[:, j + 1 :].addr_(e, u1[j, j + 1 :], alpha=-1.0)
        loss += float(err1.double().pow(2).sum())
        if i2 < in_f:
            wf[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1.0)

    if act_order:
        q_orig = torch.empty_like(q)
        q_orig[:, perm] = q
        q = q_orig
        w_orig = torch.empty_like(wf)
        w_orig[:, perm] = wf
        wf = w_orig
    q_int = q.to(torch.int32)
    return GPTQResult(
        q=q_int,
        scales=scales,
        zeros=zeros,
        weight=dequantize(q_int, scales, zeros, group_size),
        loss=loss,
        updated=wf,
    )
