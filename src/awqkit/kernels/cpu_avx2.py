"""``cpu-avx2`` backend: awqkit's own fp32-exact int4 GEMV for decoding on x86-64 CPUs (AVX2 + FMA + F16C).

Why: PyTorch's int4 CPU kernel (``cpu-int4``) is vectorized only for bf16 activations and is bound by
its unpacking at batch 1 (BENCHMARKS.md "Inference speed"); the fp32 dense model reads 4x the bytes. This
backend's kernel (``csrc/awqkit_cpu.c``, built on first use by :mod:`awqkit.kernels.native`) streams the
4-bit weights once per call and computes in fp32:

* per 64 output columns and group of ``g`` input rows it accumulates ``a = sum_k x[k] * q[k, n]`` (small
  integers widened to fp32, fp32 FMA) and adds ``s * a - (z * s) * sum_k x[k]``, which is the reference's
  ``sum_k x[k] * (q - z) * s`` reordered (``s`` widened exactly from fp16, ``z * s`` exact in fp32). Results equal the
  ``torch`` backend's to fp32 accumulation-order noise (relative error ~1e-6; the tests allow 2e-5 of the output's
  largest magnitude).
* Inputs with at most :data:`MAX_ROWS` rows (decode steps, small batches) run the kernel; larger inputs
  (prefill) go to the ``torch`` reference (dequantize + one fp32 GEMM), which is faster there on this
  machine class than both this GEMV and ``cpu-int4``.
* Layers: 4-bit, GEMM or pack-quantized storage with fp16 scales (awqkit's and AutoAWQ's), any group size
  dividing ``in_features`` (and per-row ``-1``), ``out_features % 64 == 0``, buffers on CPU. Other layers
  fall back (``auto``) per layer.
* x of any float dtype (converted to fp32 and back); calls that need gradients are declined.

Layout (built once per module at first use or by :func:`prepare_model`, kept like ``cpu-int4``'s cache,
see :mod:`awqkit.kernels._cache`): ``wq`` int32 ``[N/64, K, 8]`` = the GEMM ``qweight`` re-blocked so each
64-column block is contiguous (word ``(b, k, j)`` = ``qweight[k, 8b + j]``, nibble ``i`` = column
``64b + 8j + AWQ_ORDER[i]``); ``sp`` float16 and ``zq`` uint8 ``[N/64, K/g, 64]``: scale and zero point in the
same column order (3 bytes per group and column, as read per token). Memory: about the packed buffers again.

:func:`f16_linear` is the same kernel family for a dense fp16-stored weight (the LM head kept in its
checkpoint dtype, see :mod:`awqkit.nn.fp16_storage`): exact fp16 -> fp32 widening, fp32 accumulation.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from awqkit.kernels import _cache, native, torch_ref
from awqkit.kernels._cache import PrepareReport
from awqkit.kernels._native_checks import check_last_dim, check_optional, check_size, check_tensor, fail
from awqkit.quant.packing import AWQ_ORDER

if TYPE_CHECKING:
    from awqkit.nn.qlinear import QuantLinear

logger = logging.getLogger(__name__)

NAME = "cpu-avx2"
PRIORITY = 7  # above cpu-int4 (5): fp32-exact and faster at decode; below 10 for GPU plugins
BLOCK_N = 64
MAX_ROWS = 16  # rows up to which the GEMV beats dequantize + GEMM (decode, small batches)
_CACHE_ATTR = "_cpu_avx2_cache"
_LIB: Any = None  # the native library once is_available() has loaded it
_F32 = torch.float32


@functools.cache
def is_available() -> bool:
    """True when the native library loads here and a tiny call returns the right answer."""
    lib = native.library()
    if lib is None:
        return False
    k, n, g = 16, 64, 8
    q = (torch.arange(k * n, dtype=torch.int32) % 16).reshape(n, k)
    zeros, scales = torch.full((n, k // g), 3, dtype=torch.int32), torch.full((n, k // g), 0.5)
    wq, sp, zq = _layout(q, zeros, scales, g)
    x = torch.linspace(-1, 1, k).unsqueeze(0)
    y = torch.empty(1, n)
    lib.awqkit_int4_gemv(
        wq.data_ptr(), sp.data_ptr(), zq.data_ptr(), None, k, n, g, x.data_ptr(), y.data_ptr(), 1, 1, 0
    )
    expected = x @ ((q - 3).float() * 0.5).t()
    global _LIB
    _LIB = lib
    return bool(torch.allclose(y, expected, rtol=1e-5, atol=1e-5))


def unavailable_reason() -> str | None:
    """Why the backend is unavailable here (None when it is available)."""
    if is_available():
        return None
    return native.unavailable_reason() or "the native kernel's self-test failed"


# --------------------------------------------------------------------------- support checks
def layer_unsupported_reason(module: QuantLinear) -> str | None:
    """Why this layer cannot run on ``cpu-avx2`` (independent of the input), or None if it can."""
    if not is_available():
        return f"the native kernels are unavailable ({unavailable_reason()})"
    if module.bits != 4:
        return f"bits={module.bits} (needs 4)"
    if module.format not in _cache.SOURCES:
        return f"format={module.format!r}"
    scale = _cache.get_tensor(module, "scales" if module.format == "gemm" else "weight_scale")
    if scale is None or scale.dtype != torch.float16:
        return f"scales stored as {None if scale is None else scale.dtype} (the kernel reads float16 scales)"
    return _cache.cpu_layout_reason(module, BLOCK_N)


def supports(x: Tensor, module: QuantLinear) -> bool:
    """The registry's hook: CPU float input without autograd, and a layer :func:`layer_unsupported_reason` takes.

    Runs on every forward: a module that holds a cache (built only for a supported layer) skips the layer
    checks; :func:`forward` rebuilds a stale one (and refuses a layer that changed into an unsupported one)."""
    if not x.is_cpu or not x.is_floating_point() or (x.requires_grad and torch.is_grad_enabled()):
        return False
    return _CACHE_ATTR in module.__dict__ or layer_unsupported_reason(module) is None


# --------------------------------------------------------------------------- layout + cache
def _layout(q: Tensor, zeros: Tensor, scales: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(wq, sp, zq)`` of the module docstring from ``q`` int ``[N, K]`` (0..15), ``zeros`` int
    ``[N, K/g]`` (0..15) and ``scales`` float ``[N, K/g]`` (values exactly representable in fp16)."""
    n, k = q.shape
    nb, n_groups = n // BLOCK_N, k // group
    order = torch.tensor(AWQ_ORDER)
    # column 64b + 8j + AWQ_ORDER[i] -> (b, j, i)
    qb = q.reshape(nb, 8, 8, k)[:, :, order, :].permute(0, 3, 1, 2).to(torch.int64)  # [nb, k, j, i]
    words = (qb << (4 * torch.arange(8))).sum(-1)  # [nb, k, j] in 0 .. 2^32 - 1
    wq = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()
    cols = (8 * torch.arange(8).unsqueeze(0) + order.unsqueeze(1)).reshape(-1)  # (i, j) -> 8j + ORDER[i]
    idx = (torch.arange(nb).unsqueeze(1) * BLOCK_N + cols).reshape(-1)  # [nb * 64]

    def arrange(t: Tensor) -> Tensor:  # [N, G] -> [nb, G, 64] in (i, j) order
        return t[idx].reshape(nb, BLOCK_N, n_groups).transpose(1, 2).contiguous()

    return wq, arrange(scales.to(torch.float16)), arrange(zeros.to(torch.uint8))


@dataclass
class _Cache:
    """Converted tensors of one QuantLinear (pickles as None; rebuilt on first use): ``wq`` int32
    ``[N/64, K, 8]``, ``sp`` float16 and ``zq`` uint8 ``[N/64, K/g, 64]``, ``bias`` float32 ``[N]`` or None,
    all contiguous on CPU (checked here, once: the bound ``gemv`` reads them through raw pointers)."""

    wq: Tensor
    sp: Tensor
    zq: Tensor
    bias: Tensor | None  # float32 [N]
    group_size: int
    sources: _cache.Signature = ()
    gemv: Any = None  # gemv(x_ptr, y_ptr, rows, n_threads, accumulate): the kernel bound to this layer
    k: int = field(init=False, default=0)  # K (in_features) and N (out_features) the kernel is bound to
    n: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.k, self.n = _check_layout(self.wq, self.sp, self.zq, self.bias, self.group_size)
        self.gemv = functools.partial(
            _LIB.awqkit_int4_gemv,
            self.wq.data_ptr(),
            self.sp.data_ptr(),
            self.zq.data_ptr(),
            self.bias.data_ptr() if self.bias is not None else None,
            self.k,
            self.n,
            self.group_size,
        )

    def __reduce__(self) -> tuple:
        return (_cache.dropped, ())


def _check_layout(wq: Tensor, sp: Tensor, zq: Tensor, bias: Tensor | None, group: int) -> tuple[int, int]:
    """Everything ``awqkit_int4_gemv`` assumes of a layer's converted tensors (see the module docstring);
    returns ``(K, N)``. Raises :class:`awqkit.errors.KernelInputError`."""
    fn = "cpu_avx2._Cache"
    check_tensor(fn, "wq", wq, dtype=torch.int32, shape=(None, None, 8), what="[N/64, K, 8] packed words")
    n_blocks, k, _ = wq.shape
    check_size(fn, "n_blocks", n_blocks, why="N/64 output blocks of 64 columns")
    check_size(fn, "group_size", group, why="input rows per scale group")
    check_size(fn, "K", k, multiple_of=group, why=f"in_features in whole groups of {group}")
    layout = (n_blocks, k // group, BLOCK_N)
    check_tensor(fn, "sp", sp, dtype=torch.float16, shape=layout, what="[N/64, K/g, 64] fp16 scales")
    check_tensor(fn, "zq", zq, dtype=torch.uint8, shape=layout, what="[N/64, K/g, 64] zero points")
    check_optional(fn, "bias", bias, shape=(n_blocks * BLOCK_N,), what="[N] float32")
    return int(k), int(n_blocks * BLOCK_N)


def _fresh_cache(module: QuantLinear) -> _Cache | None:
    cache = module.__dict__.get(_CACHE_ATTR)
    return cache if cache is not None and _cache.matches(cache.sources, module) else None


def prepare_module(module: QuantLinear) -> _Cache:
    """Convert ``module`` for cpu-avx2 now (or reuse a fresh cache). Raises ValueError for layers it cannot take."""
    cache = _fresh_cache(module)
    if cache is not None:
        return cache
    reason = layer_unsupported_reason(module)
    if reason is not None:
        raise ValueError(f"cannot convert this QuantLinear for {NAME}: {reason}")
    with torch.no_grad():
        q, zeros, scales = torch_ref.unpack_module(module)  # [N, K], [N, G], [N, G]
        wq, sp, zq = _layout(q, zeros, scales, _cache.effective_group_size(module))
        bias = module.bias.detach().float().contiguous() if module.bias is not None else None
    cache = _Cache(wq, sp, zq, bias, _cache.effective_group_size(module), _cache.signature(module))
    module.__dict__[_CACHE_ATTR] = cache
    return cache


def fuse(modules: list[QuantLinear]) -> _Cache:
    """One cache computing ``cat([m(x) for m in modules], -1)`` in a single GEMV (q/k/v, gate/up).

    The layers must take the same input (``in_features``) with the same group size. Their converted
    blocks are concatenated along the output-block axis (each layer's ``N % 64 == 0``), and every module's
    own cache is re-pointed to its slice of the fused tensors, so memory is not doubled. A missing bias
    is zeros in the fused one (``y + 0.0``). Raises ValueError for layers cpu-avx2 cannot take.
    """
    caches = [prepare_module(m) for m in modules]
    if len({(c.wq.shape[1], c.group_size) for c in caches}) != 1:
        raise ValueError(
            "cannot fuse layers with different in_features or group sizes: "
            f"{[(c.wq.shape[1], c.group_size) for c in caches]}"
        )
    wq, sp, zq = (torch.cat([getattr(c, f) for c in caches]) for f in ("wq", "sp", "zq"))
    bias = None
    if any(c.bias is not None for c in caches):
        bias = torch.cat([c.bias if c.bias is not None else torch.zeros(c.wq.shape[0] * BLOCK_N) for c in caches])
    start = 0
    for m, c in zip(modules, caches, strict=True):
        nb = c.wq.shape[0]
        part = slice(start, start + nb)
        m.__dict__[_CACHE_ATTR] = _Cache(wq[part], sp[part], zq[part], c.bias, c.group_size, c.sources)
        start += nb
    return _Cache(wq, sp, zq, bias, caches[0].group_size)


def clear_cache(model: nn.Module) -> int:
    """Drop the cpu-avx2 caches of ``model`` (or of one QuantLinear); returns how many were dropped."""
    return sum(m.__dict__.pop(_CACHE_ATTR, None) is not None for m in model.modules())


def prepare_model(model: nn.Module, backend: str = "auto") -> PrepareReport:
    """Convert every QuantLinear of ``model`` that cpu-avx2 can run, up front (see
    :func:`awqkit.kernels._cache.prepare_layers` for ``backend``)."""
    return _cache.prepare_layers(model, NAME, backend, layer_unsupported_reason, prepare_module)


# --------------------------------------------------------------------------- calls
def _rows(x: Tensor, k: int) -> Tensor:
    return x.reshape(-1, k).to(torch.float32).contiguous()


_FORWARD = "cpu_avx2.forward"


def forward(x: Tensor, module: QuantLinear) -> Tensor:
    """``y = x @ W^T + b``: ``x [..., K] -> y [..., N]`` in ``x.dtype``; the native GEMV up to
    :data:`MAX_ROWS` rows, the torch reference above."""
    k, shape = module.in_features, x.shape  # lean: this runs ~200 times per decoded token
    check_last_dim(_FORWARD, "x", x, k, "in_features")
    rows = x.numel() // k
    if rows > MAX_ROWS:
        return torch_ref.forward(x, module)
    cache = module.__dict__.get(_CACHE_ATTR)
    if cache is None or not _cache.matches(cache.sources, module):
        cache = prepare_module(module)
    if cache.k != k or cache.n != module.out_features:  # the kernel writes cache.n columns of y
        fail(
            _FORWARD,
            "module",
            f"has shape (N, K) = ({module.out_features}, {k})",
            f"({cache.n}, {cache.k}) as converted (clear_cache() after changing a layer's shape)",
        )
    fp32 = x.dtype is _F32
    x2 = x if fp32 and x.is_contiguous() else x.to(_F32).contiguous()
    check_tensor(_FORWARD, "x", x2)  # CPU, dense (the conversion above made it float32, contiguous)
    y = torch.empty(shape[:-1] + (module.out_features,), dtype=_F32)
    cache.gemv(x2.data_ptr(), y.data_ptr(), rows, torch.get_num_threads(), 0)
    return y if fp32 else y.to(x.dtype)


def f16_linear_supported(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`f16_linear` runs the native kernel for this call (else it uses ``F.linear``)."""
    return (
        is_available()
        and x.is_cpu
        and weight.is_cpu
        and weight.dtype == torch.float16
        and weight.dim() == 2
        and weight.is_contiguous()
        and weight.shape[1] % 8 == 0
        and x.numel() // max(weight.shape[1], 1) <= MAX_ROWS
        and not (x.requires_grad and torch.is_grad_enabled())
    )


def f16_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight^T + bias`` for an fp16-stored ``weight [N, K]``, computed in fp32; ``y`` in ``x.dtype``.

    The native kernel for CPU inputs of at most :data:`MAX_ROWS` rows with ``K % 8 == 0``; otherwise
    ``F.linear`` on ``weight`` widened to fp32 (CPU) or to ``x.dtype`` (other devices)."""
    fn = "cpu_avx2.f16_linear"
    if weight.dim() != 2:
        fail(fn, "weight", f"has shape {tuple(weight.shape)}", "[N, K] (2 dims)")
    n, k = weight.shape
    check_last_dim(fn, "x", x, k, "the weight's in_features")
    if not f16_linear_supported(x, weight):
        dt = torch.float32 if x.is_cpu else x.dtype
        b = bias.to(dt) if bias is not None else None
        return nn.functional.linear(x.to(dt), weight.to(dt), b).to(x.dtype)
    # f16_linear_supported checked the weight (fp16 [N, K] contiguous CPU, K % 8 == 0), x (CPU) and rows
    x2 = _rows(x, k)
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    b = bias.detach().float().contiguous() if bias is not None else None
    check_optional(fn, "bias", b, shape=(n,), what="[N] = the weight's out_features")
    _LIB.awqkit_f16_gemv(
        x2.data_ptr(),
        weight.data_ptr(),
        b.data_ptr() if b is not None else None,
        y.data_ptr(),
        x2.shape[0],
        k,
        n,
        torch.get_num_threads(),
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


__all__ = [
    "NAME",
    "PRIORITY",
    "MAX_ROWS",
    "is_available",
    "unavailable_reason",
    "supports",
    "layer_unsupported_reason",
    "prepare_module",
    "prepare_model",
    "clear_cache",
    "fuse",
    "forward",
    "f16_linear",
    "f16_linear_supported",
    "PrepareReport",
]
