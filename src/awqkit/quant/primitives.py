"""Group-wise integer quantization: pure tensor functions.

Notation: a linear weight ``w`` is ``[out, in]``; with group size ``g`` (``-1`` = the whole row) the
input dimension splits into ``n_groups = in // g`` groups. Every group has one float ``scale`` and one
integer ``zero`` in ``[0, 2^bits - 1]``; the integer weight is ``q = clamp(round(w / scale) + zero, 0,
2^bits - 1)`` and the dequantized weight ``(q - zero) * scale``.

* asymmetric (``zero_point=True``, the default): ``scale = (max - min).clamp(1e-5) / (2^bits - 1)``,
  ``zero = clamp(round(-min / scale), 0, 2^bits - 1)`` (llm-awq / AutoAWQ).
* symmetric (``zero_point=False``): ``scale = max|w|.clamp(1e-5) / (2^(bits-1) - 1)`` and a fixed
  ``zero = 2^(bits-1)``, so both kinds share the same unsigned storage and dequantization.

Scales are rounded to ``scale_dtype`` (fp16 by default, as every AWQ checkpoint stores them) *before*
the integers are computed, so the fake-quantized weight equals what the packed checkpoint decodes to.
All math runs in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def resolve_group_size(in_features: int, group_size: int) -> int:
    """Concrete group size: ``in_features`` for ``-1``; checks that it divides ``in_features``."""
    g = in_features if group_size == -1 else group_size
    if g <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    if in_features % g != 0:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={g}")
    return g


def _check_weight(w: Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {w.dtype}")


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is not supported; use 2..8")


def group_view(w: Tensor, group_size: int) -> Tensor:
    """``[out, in] -> [out, n_groups, g]`` view (float32 copy when ``w`` is not float32)."""
    _check_weight(w)
    g = resolve_group_size(w.shape[1], group_size)
    return w.float().reshape(w.shape[0], w.shape[1] // g, g)


def compute_qparams(
    w: Tensor,
    bits: int,
    group_size: int,
    zero_point: bool = True,
    scale_dtype: torch.dtype | None = torch.float16,
) -> tuple[Tensor, Tensor]:
    """Scales and zeros for ``w``.

    Args:
        w: ``[out, in]`` float weight.
        bits: 2..8. group_size: divides ``in`` or -1. zero_point: asymmetric (True) or symmetric.
        scale_dtype: dtype the scales are rounded to (returned as float32 values); None keeps fp32.
    Returns:
        ``scales`` float32 ``[out, n_groups]`` and ``zeros`` int32 ``[out, n_groups]``.
    """
    _check_bits(bits)
    wg = group_view(w, group_size)
    max_int = 2**bits - 1
    if zero_point:
        wmax = wg.amax(dim=-1)
        wmin = wg.amin(dim=-1)
        scales = (wmax - wmin).clamp(min=1e-5) / max_int
        if scale_dtype is not None:
            scales = scales.to(scale_dtype).float()
        zeros = torch.clamp(torch.round(-wmin / scales), 0, max_int)
    else:
        half = 2 ** (bits - 1)
        scales = wg.abs().amax(dim=-1).clamp(min=1e-5) / (half - 1)
        if scale_dtype is not None:
            scales = scales.to(scale_dtype).float()
        zeros = torch.full_like(scales, float(half))
    return scales, zeros.to(torch.int32)


def quantize(w: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int) -> Tensor:
    """Integer weights ``q = clamp(round(w / scale) + zero, 0, 2^bits - 1)``.

    Args: ``w`` ``[out, in]``; ``scales``/``zeros`` ``[out, n_groups]``.
    Returns: int32 ``[out, in]`` with values in ``[0, 2^bits - 1]``.
    """
    _check_bits(bits)
    wg = group_view(w, group_size)
    if scales.shape != wg.shape[:2] or zeros.shape != wg.shape[:2]:
        raise ValueError(
            f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} must be [out, n_groups] = {tuple(wg.shape[:2])}"
        )
    q = torch.round(wg / scales.float().unsqueeze(-1)) + zeros.float().unsqueeze(-1)
    q = torch.clamp(q, 0, 2**bits - 1)
    return q.reshape(w.shape).to(torch.int32)


def dequantize(q: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """``(q - zero) * scale`` as float32 ``[out, in]`` from int ``q`` ``[out, in]`` and ``[out, n_groups]`` params."""
    if q.dim() != 2:
        raise ValueError(f"expected q [out, in], got {tuple(q.shape)}")
    out_f, in_f = q.shape
    g = resolve_group_size(in_f, group_size)
    qg = q.reshape(out_f, in_f // g, g).float()
    w = (qg - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.reshape(out_f, in_f)


def fake_quantize(
    w: Tensor,
    bits: int,
    group_size: int,
    zero_point: bool = True,
    scale_dtype: torch.dtype | None = torch.float16,
    *,
    inplace: bool = False,
) -> Tensor:
    """Quantize then dequantize ``w`` (``[out, in]``); returns the same dtype as ``w``.

    Equal, bit for bit, to ``dequantize(quantize(w, *compute_qparams(w, ...)), ...)``, computed in one float32
    buffer without the int32 round trip (the scale search calls this once per candidate and linear; the
    saving is measured in BENCHMARKS.md "Engine"). ``inplace=True`` writes the result into ``w`` (float32,
    contiguous) and returns it.
    """
    scales, zeros = compute_qparams(w, bits, group_size, zero_point, scale_dtype)
    wg = group_view(w, group_size)
    if inplace and (w.dtype != torch.float32 or not w.is_contiguous()):
        raise ValueError(
            f"fake_quantize(inplace=True) needs a contiguous float32 weight, got {w.dtype}"
            f"{'' if w.is_contiguous() else ' (not contiguous)'}"
        )
    s, z = scales.unsqueeze(-1), zeros.float().unsqueeze(-1)
    # the same float operations as quantize() then dequantize(): round(w / s) + z, clamped, minus z, times s
    t = wg.div_(s) if inplace else torch.div(wg, s)
    t.round_().add_(z).clamp_(0, 2**bits - 1).sub_(z).mul_(s)
    return w if inplace else t.reshape(w.shape).to(w.dtype)


def quantize_weight(
    w: Tensor,
    bits: int,
    group_size: int,
    zero_point: bool = True,
    scale_dtype: torch.dtype | None = torch.float16,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(q int32 [out, in], scales float32 [out, n_groups], zeros int32 [out, n_groups])`` of ``w``."""
    scales, zeros = compute_qparams(w, bits, group_size, zero_point, scale_dtype)
    return quantize(w, scales, zeros, bits, group_size), scales, zeros
