"""``QuantLinear``: a weight-only quantized replacement for ``nn.Linear``.

Buffers (``K = in_features``, ``N = out_features``, ``G = K / group_size``; layouts documented bit by bit
in :mod:`awqkit.quant.packing`):

* format ``"gemm"`` (the default for ``bits == 4``) — AutoAWQ ``WQLinear_GEMM`` names: ``qweight`` int32
  ``[K, N/8]``, ``qzeros`` int32 ``[G, N/8]``, ``scales`` ``[G, N]`` (fp16), optional ``bias`` ``[N]`` (fp16).
  Symmetric weights store ``qzeros`` filled with 8.
* format ``"pack-quantized"`` (the default for other bits; also accepted for 4 bits, as llm-compressor
  writes W4A16 checkpoints) — compressed-tensors names: ``weight_packed`` int32 ``[N, ceil(K*bits/32)]``,
  ``weight_scale`` ``[N, G]``, ``weight_zero_point`` int32 ``[ceil(N*bits/32), G]`` (asymmetric only),
  ``weight_shape`` int64 ``[2]``, optional ``bias`` ``[N]``.

The forward pass goes through the kernel registry (:mod:`awqkit.kernels`), backend ``self.backend``
(default ``"auto"``). Float buffers keep their stored dtype under ``module.to(dtype)`` / ``.half()``
(only devices change), so casting a model never re-rounds the scales.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from awqkit import kernels
from awqkit.kernels import torch_ref
from awqkit.quant.packing import pack_ct, pack_gemm
from awqkit.quant.primitives import quantize_weight, resolve_group_size

logger = logging.getLogger(__name__)

FORMATS = ("gemm", "pack-quantized")
GEMM_BUFFERS = ("qweight", "qzeros", "scales")
CT_BUFFERS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


class QuantLinear(nn.Module):
    """Weight-only ``bits``-bit linear layer (group-wise scales and integer zeros).

    Args:
        in_features, out_features: as ``nn.Linear``.
        bits: 2..8.
        group_size: input channels per scale group, or -1 for one group per row.
        bias: allocate a ``bias`` buffer.
        dtype: dtype of ``scales``/``weight_scale`` and ``bias`` (fp16, as checkpoints store them).
        zero_point: asymmetric (True) or symmetric; drops ``weight_zero_point`` in the pack-quantized format.
        device: where the (zero-filled) buffers are allocated.
        format: ``"gemm"`` (4 bits only) or ``"pack-quantized"``; None picks ``"gemm"`` for 4 bits.
    """

    # how awqkit.kernels recognises these layers when it walks a model (the kernels sit below nn/ and do not
    # import it: :func:`awqkit.kernels._cache.is_quant_linear`)
    awqkit_quant_linear = True

    # The buffers __init__ registers (which ones depends on the format; see the module docstring), declared for
    # type checkers: nn.Module.__getattr__ types unknown attributes as ``Tensor | Module``.
    qweight: Tensor
    qzeros: Tensor
    scales: Tensor
    weight_packed: Tensor
    weight_scale: Tensor
    weight_zero_point: Tensor  # asymmetric pack-quantized only: read it with getattr(module, ..., None)
    weight_shape: Tensor
    bias: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = 128,
        bias: bool = False,
        dtype: torch.dtype = torch.float16,
        *,
        zero_point: bool = True,
        device: torch.device | str | None = None,
        format: str | None = None,
    ) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits={bits} is not supported by QuantLinear; use 2..8")
        format = format or ("gemm" if bits == 4 else "pack-quantized")
        if format not in FORMATS or (format == "gemm" and bits != 4):
            raise ValueError(
                f"format={format!r} with bits={bits} is not supported; use 'gemm' (4 bits) or 'pack-quantized'"
            )
        g = resolve_group_size(in_features, group_size)
        if format == "gemm" and out_features % 8 != 0:
            raise ValueError(
                f"out_features={out_features} is not a multiple of 8, which the 4-bit GEMM layout requires; "
                "keep this linear unquantized (modules_to_not_convert)"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.zero_point = zero_point
        self._format = format
        self.backend = "auto"
        n_groups = in_features // g
        i32 = torch.int32
        if format == "gemm":
            self.register_buffer("qweight", torch.zeros(in_features, out_features // 8, dtype=i32, device=device))
            self.register_buffer("qzeros", torch.zeros(n_groups, out_features // 8, dtype=i32, device=device))
            self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=dtype, device=device))
        else:
            self.register_buffer(
                "weight_packed", torch.zeros(out_features, math.ceil(in_features * bits / 32), dtype=i32, device=device)
            )
            self.register_buffer("weight_scale", torch.zeros(out_features, n_groups, dtype=dtype, device=device))
            if zero_point:
                self.register_buffer(
                    "weight_zero_point",
                    torch.zeros(math.ceil(out_features * bits / 32), n_groups, dtype=i32, device=device),
                )
            self.register_buffer(
                "weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device)
            )
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> QuantLinear:
        """Move buffers like ``nn.Module`` does, but undo dtype casts of the float buffers (scales, bias)."""
        before = {n: b for n, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    @property
    def format(self) -> str:
        """``"gemm"`` (AutoAWQ layout) or ``"pack-quantized"`` (compressed-tensors layout)."""
        return self._format

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int,
        group_size: int,
        zero_point: bool = True,
        *,
        format: str | None = None,
        integers: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> QuantLinear:
        """Quantize ``linear.weight`` ``[out, in]`` (fp16-rounded scales) and pack it; bias kept in fp16.

        The result lives on ``linear.weight``'s device and dequantizes exactly to
        ``primitives.fake_quantize(linear.weight, bits, group_size, zero_point)`` (in float32). With ``integers``
        ``(q int [out, in], scales float32 [out, n_groups], zeros int [out, n_groups])``, the integers a rounding
        method chose (:class:`awqkit.algo.results.RoundingEntry`), those are packed as given instead.
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if w.device.type == "meta":
            raise ValueError("cannot quantize a linear whose weight is on the meta device; load its weights first")
        out_f, in_f = w.shape
        module = cls(
            in_f,
            out_f,
            bits,
            group_size,
            bias=linear.bias is not None,
            zero_point=zero_point,
            device=w.device,
            format=format,
        )
        if integers is None:
            q, scales, zeros = quantize_weight(w, bits, group_size, zero_point, scale_dtype=torch.float16)
        else:
            q, scales, zeros = _checked_integers(integers, out_f, in_f, bits, group_size, w.device)
        if module.format == "gemm":
            qweight, qzeros, sc = pack_gemm(q, zeros, scales)
            module.qweight.copy_(qweight)
            module.qzeros.copy_(qzeros)
            module.scales.copy_(sc)
        else:
            packed = pack_ct(q, zeros, scales, bits, include_zero_point=zero_point)
            for name, tensor in packed.items():
                getattr(module, name).copy_(tensor)
        if linear.bias is not None and module.bias is not None:  # the buffer exists exactly when linear has a bias
            module.bias.copy_(linear.bias.detach().to(torch.float16))
        return module

    def dequantized_weight(self) -> Tensor:
        """Float32 ``[out, in]`` weight ``(q - zero) * scale``."""
        return torch_ref.dequantize_module(self)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., in] -> [..., out]`` in ``x.dtype`` (computed in float32 on CPU by the torch backend)."""
        return kernels.resolve_backend(self.backend, x, self).fn(x, self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, zero_point={self.zero_point}, bias={self.bias is not None}, "
            f"format={self.format}"
        )


def _checked_integers(
    integers: tuple[Tensor, Tensor, Tensor], out_f: int, in_f: int, bits: int, group_size: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Given integers, checked against the linear's shape and the bit width, as int32/float32/int32 on ``device``."""
    q, scales, zeros = integers
    n_groups = in_f // resolve_group_size(in_f, group_size)
    if tuple(q.shape) != (out_f, in_f) or tuple(scales.shape) != (out_f, n_groups) or scales.shape != zeros.shape:
        raise ValueError(
            f"integers q {tuple(q.shape)}, scales {tuple(scales.shape)}, zeros {tuple(zeros.shape)} do not fit a "
            f"[{out_f}, {in_f}] weight with group size {group_size} ([out, in], [out, {n_groups}] twice)"
        )
    top = 2**bits - 1
    if int(q.min()) < 0 or int(q.max()) > top or int(zeros.min()) < 0 or int(zeros.max()) > top:
        raise ValueError(f"integers outside [0, {top}] for {bits}-bit weights")
    return q.to(device, torch.int32), scales.to(device, torch.float32), zeros.to(device, torch.int32)


__all__ = ["QuantLinear", "FORMATS", "GEMM_BUFFERS", "CT_BUFFERS"]
