"""Linear ops of awqkit's decode loop: several linears that read the same input, run as one.

:func:`bind` returns a :class:`LinearOp` for a list of sibling linears (``[q, k, v]``, ``[gate, up]``,
``[o]``): ``op(x, residual)`` computes ``cat([m(x) for m in modules], -1)`` and, when ``residual`` is
given, adds it in place (``residual += y``, the decoder's skip connection) and returns it.

* :class:`FusedInt4` — every module is a 4-bit ``QuantLinear`` the ``cpu-avx2`` kernel takes and whose
  backend is ``auto`` or ``cpu-avx2``: one native GEMV over the concatenated layers
  (:func:`awqkit.kernels.cpu_avx2.fuse`) for up to ``MAX_ROWS`` rows, the residual added inside the kernel
  (the same ``(W x + b) + r`` sum); more rows (prefill) call the modules.
* :class:`ModuleCalls` — anything else (dense ``nn.Linear``, other backends): the modules' own forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import Tensor, nn

from awqkit.kernels import cpu_avx2
from awqkit.kernels._native_checks import check_last_dim, check_tensor, fail
from awqkit.nn.qlinear import QuantLinear

if TYPE_CHECKING:
    from awqkit.nn.qlinear import QuantLinear

_F32 = torch.float32
_FN = "FusedInt4"


class LinearOp(Protocol):
    out_features: int

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor: ...


def _size(module: nn.Module, name: str) -> int:
    """``int(module.<name>)``: ``in_features`` / ``out_features`` of an ``nn.Linear`` or ``QuantLinear`` (plain
    attributes, which ``nn.Module.__getattr__`` types as ``Tensor | Module``)."""
    return int(getattr(module, name))


class ModuleCalls:
    """``cat([m(x) for m in modules], -1)`` (+ residual in place) through the modules' own forward."""

    kind = "modules"

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.out_features = sum(_size(m, "out_features") for m in modules)

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        ys = [m(x) for m in self.modules]
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
        return y if residual is None else residual.add_(y)


class FusedInt4:
    """The siblings as one ``cpu-avx2`` GEMV (see the module docstring): ``x [..., K]`` -> ``[..., N]``
    (``N`` = the siblings' summed ``out_features``); with ``residual [..., N]`` (x's leading dims, float32,
    contiguous, CPU) the result is added into it in place. The native GEMV takes float32 contiguous CPU
    ``x`` of up to ``MAX_ROWS`` rows; other dtypes, strides and more rows call the modules."""

    kind = "cpu-avx2 fused"

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.cache: Any = cpu_avx2.fuse(cast("list[QuantLinear]", modules))  # bind() checked: fusable_reason()
        self.out_features = sum(_size(m, "out_features") for m in modules)
        self.in_features = _size(modules[0], "in_features")
        if (self.cache.k, self.cache.n) != (self.in_features, self.out_features):
            fail(
                _FN,
                "modules",
                f"have shape (N, K) = ({self.out_features}, {self.in_features})",
                f"({self.cache.n}, {self.cache.k}) as the fused kernel was built",
            )
        self._fallback = ModuleCalls(modules)

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        k = self.in_features
        check_last_dim(_FN, "x", x, k, "in_features")  # rows = numel // K below
        rows = x.numel() // k
        if rows > cpu_avx2.MAX_ROWS or x.dtype is not _F32 or not x.is_contiguous():
            return self._fallback(x, residual)
        if not x.is_cpu or x.layout is not torch.strided:
            check_tensor(_FN, "x", x)  # names the device / layout
        n = self.out_features
        if residual is None:
            y = torch.empty(x.shape[:-1] + (n,), dtype=_F32)
            self.cache.gemv(x.data_ptr(), y.data_ptr(), rows, torch.get_num_threads(), 0)
            return y
        want = (*x.shape[:-1], n)  # a plain tuple: cheaper than slicing a torch.Size into another
        check_tensor(_FN, "residual", residual, shape=want, what="[x's leading dims, out_features]")
        self.cache.gemv(x.data_ptr(), residual.data_ptr(), rows, torch.get_num_threads(), 1)
        return residual


def fusable_reason(modules: list[nn.Module]) -> str | None:
    """Why these siblings cannot run as one ``cpu-avx2`` GEMV (None when they can)."""

    for m in modules:
        if not isinstance(m, QuantLinear):
            return f"{type(m).__name__} is not a QuantLinear"
        if m.backend not in ("auto", cpu_avx2.NAME):
            return f"backend {m.backend!r} was chosen"
        reason = cpu_avx2.layer_unsupported_reason(m)
        if reason is not None:
            return reason
    if len({(m.in_features, m.group_size) for m in modules}) != 1:
        return "different in_features or group sizes"
    return None


def bind(modules: list[nn.Module]) -> FusedInt4 | ModuleCalls:
    """The fastest op computing these siblings (see the module docstring)."""
    return FusedInt4(modules) if fusable_reason(modules) is None else ModuleCalls(modules)


__all__ = ["FusedInt4", "LinearOp", "ModuleCalls", "bind", "fusable_reason"]
