"""Reference backend in plain PyTorch: unpack, dequantize, matmul. The oracle for every other backend.

Nothing is cached: each call unpacks the module's buffers again, so results always reflect the
current buffers (slow but obviously correct).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from awqkit.quant.packing import unpack_awq_rows, unpack_ct, unpack_gemm
from awqkit.quant.primitives import dequantize

if TYPE_CHECKING:
    from awqkit.nn.qlinear import QuantLinear


def unpack_module(module: QuantLinear) -> tuple[Tensor, Tensor, Tensor]:
    """``q`` int32 ``[out, in]``, ``zeros`` int32 ``[out, n_groups]``, ``scales`` float32 ``[out, n_groups]``
    of a :class:`QuantLinear`, whichever layout it stores (``module.format``: gemm or pack-quantized)."""
    if module.format == "gemm":
        return unpack_gemm(module.qweight, module.qzeros, module.scales)
    return unpack_ct(
        module.weight_packed,
        module.weight_scale,
        (module.out_features, module.in_features),
        module.bits,
        getattr(module, "weight_zero_point", None),
    )


def dequantize_module(module: QuantLinear) -> Tensor:
    """Float32 weight ``[out, in]`` = ``(q - zero) * scale`` of a :class:`QuantLinear`."""
    q, zeros, scales = unpack_module(module)
    return dequantize(q, scales, zeros, module.group_size)


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 on CPU (no fast half-precision matmul there), else ``x.dtype``."""
    return torch.float32 if x.device.type == "cpu" else x.dtype


def forward(x: Tensor, module: QuantLinear) -> Tensor:
    """``y = x @ W^T + b`` with ``W`` dequantized on the fly; ``x [..., in] -> y [..., out]`` in ``x.dtype``."""
    if x.shape[-1] != module.in_features:
        raise ValueError(
            f"input last dim {x.shape[-1]} does not match in_features={module.in_features} of this QuantLinear"
        )
    dt = compute_dtype(x)
    bias = module.bias.to(device=x.device, dtype=dt) if module.bias is not None else None
    if module.format == "gemm":  # dequantize in the stored [in, out] orientation: no transposes
        w_t = dequantize_gemm_t(module.qweight, module.qzeros, module.scales).to(device=x.device, dtype=dt)
        y = torch.matmul(x.to(dt), w_t)
        return (y + bias if bias is not None else y).to(x.dtype)
    weight = dequantize_module(module).to(device=x.device, dtype=dt)
    y = torch.nn.functional.linear(x.to(dt), weight, bias)
    return y.to(x.dtype)


def dequantize_gemm_t(qweight: Tensor, qzeros: Tensor, scales: Tensor) -> Tensor:
    """``W^T`` float32 ``[in, out]`` from GEMM tensors: ``(q[k, n] - z[k // g, n]) * s[k // g, n]``."""
    in_f = qweight.shape[0]
    n_groups, out_f = scales.shape
    q = unpack_awq_rows(qweight).view(n_groups, in_f // n_groups, out_f)
    z = unpack_awq_rows(qzeros).unsqueeze(1)
    return ((q - z).float() * scales.float().unsqueeze(1)).view(in_f, out_f)
