"""``cpu-int4`` backend: PyTorch's own int4 weight-only CPU kernels (the ones torchao and gptqmodel use).

Ops: ``torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, inner_k_tiles)`` packs the weight once,
``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)`` multiplies.

Probe findings (torch 2.13.0+cpu, AMD EPYC with AVX2 and no AVX-512 / bf16 / fp16 arithmetic units)
--------------------------------------------------------------------------------------------------
* Weight: int32 ``[N, K]`` (``N = out``, ``K = in``) holding the unsigned nibbles 0..15; uint8 input is
  refused ("expect weight to be kInt"). The result is uint8 ``[N, K/2]`` in an ISA-specific blocked
  order (it differs between AVX2 and AVX-512 builds), so it is only ever a process-local cache, never
  saved. ``inner_k_tiles`` (1..16 all accepted) is ignored on CPU; we pass 2.
* ``scales_and_zeros``: ``[K/g, N, 2]`` (``[..., 0]`` scale, ``[..., 1]`` zero) in *exactly* the dtype of
  ``x`` (fp32 with fp32, bf16 with bf16, fp16 with fp16; mixing raises). The kernel computes
  ``w = (q - 8) * scale + zero`` with ``zero`` in the float domain, so AWQ's ``(q - z) * s`` needs
  ``zero = (8 - z) * s``. It must be contiguous: a non-contiguous tensor of the right shape is accepted
  *silently with wrong results* (seen in the probe), so we always pass ``.contiguous()``. The shape is
  checked as ``[:, N, 2]``.
* ``x``: 2-D and contiguous (a 3-D or non-contiguous ``x`` raises); ``M = 0`` works. Output
  ``[M, N]`` in ``x.dtype``. Accepted dtypes: float32, bfloat16, float16.
* Group sizes: 32, 64, 128, 256 only (16, 48, 512 and a per-row group ``g = K`` outside that set raise).
* Shapes: ``N % 16 == 0`` (N = 8, 24, 40 raise); ``K % g == 0``, nothing else (K = 96, 160 work).
* Speed (the reason for the default compute dtype below): on x86 only the **bfloat16** path is
  vectorized (AVX2/AVX-512 ``tinygemm_kernel`` for ``BFloat16``: bf16 inputs widened to fp32, fp32 FMA
  accumulation, output rounded to bf16). float32 and float16 fall back to a scalar per-element loop, more than
  ten times slower than the bf16 path and than an fp32 ``nn.Linear`` at batch 1, and further behind as the
  batch grows: the fp32 route is no faster than the torch reference backend (``awqkit bench --backend
  torch,cpu-int4`` measures both on a folder).

Compute dtype
-------------
Default ``bfloat16``: ``x`` is rounded to bf16, scales and float zeros are stored in bf16, the kernel
accumulates in fp32 and rounds its output to bf16, which is then cast back to ``x.dtype`` (bias added
in fp32 before that last cast). Relative error against the fp32 torch backend is therefore of the order
of the bf16 unit roundoff ``2^-9`` (a few 1e-3 relative on an output, see the tests), unlike the torch
backend's fp32-exact result. ``compute_dtype=torch.float32`` (per module, via :func:`prepare_module` /
:func:`prepare_model`) keeps everything in fp32 and matches the reference to fp32 accumulation-order
noise, at the scalar kernel's speed. float16 is not offered (scalar *and* lossy).

Caching
-------
The packed weight and ``scales_and_zeros`` are converted once per module and kept in a private,
non-buffer attribute (``_cpu_int4_cache``): not in ``state_dict()``/``named_buffers()``, not moved by
``.to()``. It holds weak references to the source buffers plus their version counters, and is rebuilt
when a source buffer is replaced (``load_state_dict(assign=True)``, ``.to(device)``), modified in place
(``copy_``), or the compute dtype changes. It costs about as much memory as ``qweight`` again.
:func:`prepare_model` converts every layer up front and logs the layers that fall back.

Calls that ask for gradients (``x.requires_grad`` with grad mode on) are declined, since the aten op
has no autograd formula; ``auto`` then uses the torch backend.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from awqkit.kernels import _cache, torch_ref
from awqkit.kernels._cache import PrepareReport

if TYPE_CHECKING:
    from awqkit.nn.qlinear import QuantLinear

logger = logging.getLogger(__name__)

NAME = "cpu-int4"
PRIORITY = 5  # above "torch" (0) so "auto" picks it on CPU when it supports the call; below 10 for faster (GPU) plugins
GROUP_SIZES = (32, 64, 128, 256)
N_MULTIPLE = 16
COMPUTE_DTYPES = (torch.bfloat16, torch.float32)
DEFAULT_COMPUTE_DTYPE = torch.bfloat16
INNER_K_TILES = 2  # ignored by the CPU kernel; 2 is a value every backend of the op accepts

_CACHE_ATTR = "_cpu_int4_cache"
_DTYPE_ATTR = "_cpu_int4_compute_dtype"


def _ops() -> tuple[Callable[..., Tensor], Callable[..., Tensor]] | None:
    aten = torch.ops.aten
    if not (hasattr(aten, "_convert_weight_to_int4pack_for_cpu") and hasattr(aten, "_weight_int4pack_mm_for_cpu")):
        return None
    return aten._convert_weight_to_int4pack_for_cpu, aten._weight_int4pack_mm_for_cpu


_OPS = _ops()
_MM = _OPS[1] if _OPS is not None else None  # resolved once: forward runs on every call


@functools.cache
def is_available() -> bool:
    """True when this torch has the aten int4 CPU ops and a tiny smoke call returns the right answer."""
    ops = _ops()
    if ops is None:
        return False
    convert, mm = ops
    try:
        q = (torch.arange(16 * 32, dtype=torch.int32) % 16).reshape(16, 32)
        packed = convert(q, INNER_K_TILES)
        sz = torch.stack([torch.ones(1, 16), torch.zeros(1, 16)], dim=-1).contiguous()  # w = q - 8
        y = mm(torch.ones(1, 32), packed, 32, sz)
        expected = (q - 8).sum(dim=1).float().unsqueeze(0)
        return bool(torch.equal(y, expected))
    except Exception as exc:  # broken or partial build: not available, say why at debug level
        logger.debug("cpu-int4 smoke test failed: %s", exc)
        return False


# --------------------------------------------------------------------------- support checks
def layer_unsupported_reason(module: QuantLinear) -> str | None:
    """Why this layer cannot run on ``cpu-int4`` (independent of the input), or None if it can."""
    if not is_available():
        return "the aten int4 CPU ops are missing or broken in this torch build"
    if module.bits != 4:
        return f"bits={module.bits} (needs 4)"
    if module.format not in ("gemm", "pack-quantized"):
        return f"format={module.format!r}"
    g = _cache.effective_group_size(module)
    if g not in GROUP_SIZES:
        what = f"group_size={module.group_size}" + (f" (= in_features {g})" if module.group_size == -1 else "")
        return f"{what} (kernel takes {', '.join(map(str, GROUP_SIZES))})"
    return _cache.cpu_layout_reason(module, N_MULTIPLE)


def call_unsupported_reason(x: Tensor, module: QuantLinear) -> str | None:
    """Why ``cpu-int4`` cannot run ``module`` on this ``x``, or None if it can."""
    reason = layer_unsupported_reason(module)
    if reason is not None:
        return reason
    if not x.is_cpu:
        return f"x on {x.device} (needs cpu)"
    if not x.is_floating_point():
        return f"x dtype {x.dtype} (needs a float dtype)"
    if x.requires_grad and torch.is_grad_enabled():
        return "x requires grad (the aten int4 op has no autograd formula)"
    return None


def supports(x: Tensor, module: QuantLinear) -> bool:
    """The registry's ``supports`` hook: 4-bit, CPU, group size 32/64/128/256, ``N % 16 == 0``, no grad.

    Runs on every forward, so a module with a fresh cache (only ever built for a supported layer whose
    buffers have not changed since) skips the layer checks."""
    if not x.is_cpu or not x.is_floating_point() or (x.requires_grad and torch.is_grad_enabled()):
        return False
    if _fresh_cache(module) is not None:
        return True
    return layer_unsupported_reason(module) is None


# --------------------------------------------------------------------------- conversion + cache
@dataclass
class _Cache:
    """Converted tensors of one QuantLinear. Pickling or deep-copying the module drops it (it unpickles
    as None; the copy converts again on first use): weak references do not pickle, and the packed
    order is specific to the CPU it was built on."""

    packed: Tensor  # uint8 [N, K/2], ISA-specific order
    scales_and_zeros: Tensor  # [K/g, N, 2] contiguous, compute dtype
    bias: Tensor | None  # float32 [N]
    compute_dtype: torch.dtype
    group_size: int
    # (buffer name, weak reference or None when absent, version counter) of every source tensor
    sources: _cache.Signature = ()

    def __reduce__(self) -> tuple:
        return (_cache.dropped, ())


def _fresh_cache(module: QuantLinear) -> _Cache | None:
    """The module's cache if it still matches its buffers and compute dtype, else None."""
    cache = module.__dict__.get(_CACHE_ATTR)
    if cache is None or cache.compute_dtype != module.__dict__.get(_DTYPE_ATTR, DEFAULT_COMPUTE_DTYPE):
        return None
    return cache if _cache.matches(cache.sources, module) else None


def convert(module: QuantLinear, compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE) -> tuple[Tensor, Tensor]:
    """``(packed, scales_and_zeros)`` for the aten kernel from a 4-bit QuantLinear (no caching).

    ``packed``: the kernel's uint8 packing of ``q`` int32 ``[N, K]``; ``scales_and_zeros``:
    ``[K/g, N, 2]`` with ``scale = s`` and ``zero = (8 - z) * s`` (float domain, computed in fp32 and
    rounded once to ``compute_dtype``), so the kernel's ``(q - 8) * scale + zero`` is ``(q - z) * s``.
    """
    reason = layer_unsupported_reason(module)
    if reason is not None:
        raise ValueError(f"cannot convert this QuantLinear for cpu-int4: {reason}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype} is not supported by cpu-int4; use one of {COMPUTE_DTYPES}")
    if _OPS is None:  # layer_unsupported_reason() already said so
        raise ValueError("cannot convert this QuantLinear for cpu-int4: this torch lacks the aten int4 CPU ops")
    convert_op = _OPS[0]
    # q int32 [N, K] (AWQ nibble order undone by unpack_gemm), zeros int32 [N, G], scales fp32 [N, G]
    q, zeros, scales = torch_ref.unpack_module(module)
    packed = convert_op(q.contiguous(), INNER_K_TILES)
    zero_f = (8 - zeros).float() * scales
    sz = torch.stack([scales, zero_f], dim=-1).transpose(0, 1).to(compute_dtype).contiguous()
    return packed, sz


def prepare_module(module: QuantLinear, compute_dtype: torch.dtype | None = None) -> _Cache:
    """Convert ``module`` for cpu-int4 now (or reuse a fresh cache) and return the cache.

    ``compute_dtype``: None keeps the module's current choice (bf16 unless set before); passing one
    records it on the module for later calls. Raises ValueError for layers the kernel cannot take.
    """
    if compute_dtype is not None:
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={compute_dtype} is not supported by cpu-int4; use one of {COMPUTE_DTYPES}")
        module.__dict__[_DTYPE_ATTR] = compute_dtype
    dt = module.__dict__.get(_DTYPE_ATTR, DEFAULT_COMPUTE_DTYPE)
    cache = _fresh_cache(module)
    if cache is not None:
        return cache
    with torch.no_grad():
        packed, sz = convert(module, dt)
        bias = module.bias.detach().float() if module.bias is not None else None
    cache = _Cache(packed, sz, bias, dt, _cache.effective_group_size(module), _cache.signature(module))
    module.__dict__[_CACHE_ATTR] = cache
    return cache


def clear_cache(model: nn.Module) -> int:
    """Drop the cpu-int4 caches of ``model`` (or of one QuantLinear); returns how many were dropped."""
    dropped = 0
    for m in model.modules():
        if m.__dict__.pop(_CACHE_ATTR, None) is not None:
            dropped += 1
    return dropped


def forward(x: Tensor, module: QuantLinear) -> Tensor:
    """``y = x @ W^T + b`` through the aten int4 kernel; ``x [..., K] -> y [..., N]`` in ``x.dtype``."""
    if x.shape[-1] != module.in_features:
        raise ValueError(
            f"input last dim {x.shape[-1]} does not match in_features={module.in_features} of this QuantLinear"
        )
    cache = _fresh_cache(module) or prepare_module(module)
    if _MM is None:  # prepare_module() refuses a torch without the ops; a fresh cache needs them too
        raise ValueError("cpu-int4: this torch lacks the aten int4 CPU ops")
    x2 = x.reshape(-1, module.in_features).to(cache.compute_dtype).contiguous()
    y = _MM(x2, cache.packed, cache.group_size, cache.scales_and_zeros)
    if cache.bias is not None:  # in fp32: a bf16 y + an fp32 bias promotes to fp32 in one op
        y = y + cache.bias
    return y.to(x.dtype).reshape(*x.shape[:-1], module.out_features)


# --------------------------------------------------------------------------- whole models
def prepare_model(
    model: nn.Module, backend: str = "auto", *, compute_dtype: torch.dtype | None = None
) -> PrepareReport:
    """Convert every QuantLinear of ``model`` that cpu-int4 can run, up front (one conversion per layer).

    Args:
        model: any module tree holding :class:`~awqkit.nn.qlinear.QuantLinear` layers.
        backend: ``"auto"``: layers the kernel cannot take stay on the torch backend (one INFO line each,
            with the reason); ``"cpu-int4"``: every layer must be supported, else ValueError listing the
            offenders (nothing is converted then).
        compute_dtype: ``torch.bfloat16`` (fast, the default) or ``torch.float32`` (fp32-exact, scalar
            kernel); None keeps each module's current choice.
    Does not change ``module.backend``; ``load_quantized`` sets that. Returns a :class:`PrepareReport`.
    """
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype} is not supported by cpu-int4; use one of {COMPUTE_DTYPES}")
    return _cache.prepare_layers(
        model, NAME, backend, layer_unsupported_reason, lambda m: prepare_module(m, compute_dtype)
    )


__all__ = [
    "NAME",
    "PRIORITY",
    "GROUP_SIZES",
    "COMPUTE_DTYPES",
    "DEFAULT_COMPUTE_DTYPE",
    "is_available",
    "supports",
    "layer_unsupported_reason",
    "call_unsupported_reason",
    "convert",
    "prepare_module",
    "prepare_model",
    "clear_cache",
    "forward",
    "PrepareReport",
]
