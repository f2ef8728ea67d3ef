"""The whole decoder stack of a decode step as one native call (``awqkit_decode_layers`` in
``kernels/csrc/awqkit_cpu.c``).

When every linear of every layer is a fused ``cpu-avx2`` op (:class:`awqkit.runtime.linear.FusedInt4`) and
attention can run natively (``head_dim % 8 == 0``), :class:`NativeStack` describes the layers once as C
structs (pointers to the converted weights, norms and KV caches; sizes) and a decode step of ``B <=
MAX_ROWS`` rows becomes one ctypes call instead of ~9 per layer. The C function calls the same kernels in
the same order as :class:`awqkit.runtime.decoder.Decoder`'s per-op path, so the results are the same to the
bit (tested); what it saves is the Python and dispatch time between the kernels (measured in BENCHMARKS.md
"Inference speed: where the decode time goes").

The structs hold raw pointers: :meth:`NativeStack.bind_caches` must be called whenever the KV caches are
(re)allocated, and the stack keeps references to every tensor it points to. Nothing the C code relies on is
trusted: ``bind_caches`` checks the caches, every step checks ``h``, ``pos``, the rotary tables and that the
bound caches are still the buffers the structs point to (:mod:`awqkit.kernels._native_checks`).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from awqkit.errors import KernelInputError
from awqkit.kernels import cpu_avx2, native
from awqkit.kernels._native_checks import (
    check_kv_caches,
    check_optional,
    check_position,
    check_rope,
    check_rows,
    check_tensor,
)
from awqkit.runtime.linear import FusedInt4, ModuleCalls

if TYPE_CHECKING:
    from awqkit.runtime.decoder import _Layer

_P, _I64, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _Linear(ctypes.Structure):
    _fields_ = [("wq", _P), ("sp", _P), ("zq", _P), ("bias", _P), ("K", _I64), ("N", _I64), ("group", _I64)]


class _LayerStruct(ctypes.Structure):
    _fields_ = [
        ("qkv", _Linear),
        ("o", _Linear),
        ("gu", _Linear),
        ("down", _Linear),
        ("in_norm", _P),
        ("post_norm", _P),
        ("q_norm", _P),
        ("k_norm", _P),
        ("kc", _P),
        ("vc", _P),
        ("eps", _F),
        ("norm_eps", _F),
        ("scale", _F),
        ("H", _I64),
        ("KV", _I64),
        ("D", _I64),
        ("maxlen", _I64),
        ("window", _I64),
    ]


def _ptr(t: Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _linear(op: FusedInt4 | ModuleCalls) -> _Linear:
    if not isinstance(op, FusedInt4):  # unsupported_reason() refuses such layers
        raise TypeError(f"NativeStack: a {op.kind!r} linear is not a fused cpu-avx2 op")
    c = op.cache
    return _Linear(
        c.wq.data_ptr(),
        c.sp.data_ptr(),
        c.zq.data_ptr(),
        _ptr(c.bias),
        c.wq.shape[1],
        c.wq.shape[0] * cpu_avx2.BLOCK_N,
        c.group_size,
    )


def unsupported_reason(layers: list[_Layer], hidden: int) -> str | None:
    """Why the stack cannot run these layers as one native call (None when it can)."""
    if native.library() is None:
        return f"native kernels unavailable ({native.unavailable_reason()})"
    first = layers[0]
    for i, lay in enumerate(layers):
        ops = (lay.qkv, lay.o, lay.gate_up, lay.down)
        s0, s1 = first.shape, lay.shape
        if (s1.heads, s1.kv_heads, s1.head_dim, lay.qkv.out_features, lay.gate_up.out_features) != (
            s0.heads,
            s0.kv_heads,
            s0.head_dim,
            first.qkv.out_features,
            first.gate_up.out_features,
        ):
            return (
                f"layer {i} differs in heads, head_dim or projection widths from layer 0 (the scratch layout "
                "and the rotary tables assume one shape)"
            )
        fused = [op for op in ops if isinstance(op, FusedInt4)]
        if len(fused) != len(ops):
            return f"layer {i} has linears that are not cpu-avx2 int4"
        qkv, o, gate_up, down = fused
        sh = lay.shape
        if sh.head_dim % 8:
            return f"head_dim {sh.head_dim} is not a multiple of 8"
        if (qkv.in_features, o.out_features, gate_up.in_features, down.out_features) != (hidden,) * 4:
            return f"layer {i}: projections do not map hidden size {hidden} to itself"
        if o.in_features != sh.heads * sh.head_dim or down.in_features * 2 != gate_up.out_features:
            return f"layer {i}: o/down input sizes do not match attention heads / the gate-up width"
        if any(
            t is not None and (t.dtype != torch.float32 or not t.is_contiguous())
            for t in (lay.in_norm, lay.post_norm, lay.q_norm, lay.k_norm)
        ):
            return f"layer {i}: norm weights are not contiguous float32"
    return None


class NativeStack:
    """All decoder layers as one ``awqkit_decode_layers`` call (see the module docstring)."""

    def __init__(self, layers: list[_Layer], hidden: int) -> None:
        reason = unsupported_reason(layers, hidden)
        if reason is not None:
            raise ValueError(f"cannot run the decoder stack natively: {reason}")
        self.layers, self.hidden = layers, hidden
        self.structs: Any = None
        self._bound: list[tuple[Tensor, Tensor, int, int, tuple[int, ...]]] = []
        self.maxlen = self.batch = 0
        fn = "NativeStack"
        for i, lay in enumerate(layers):  # what the structs will point to, checked once
            d = (lay.shape.head_dim,)
            check_tensor(fn, f"layers[{i}].in_norm", lay.in_norm, shape=(hidden,), what="[hidden]")
            check_tensor(fn, f"layers[{i}].post_norm", lay.post_norm, shape=(hidden,), what="[hidden]")
            check_optional(fn, f"layers[{i}].q_norm", lay.q_norm, shape=d, what="[head_dim]")
            check_optional(fn, f"layers[{i}].k_norm", lay.k_norm, shape=d, what="[head_dim]")
        lay = layers[0]
        self._width = (
            hidden
            + lay.qkv.out_features
            + lay.shape.heads * lay.shape.head_dim
            + lay.gate_up.out_features
            + lay.gate_up.out_features // 2
        )

    def bind_caches(self, k_cache: list[Tensor], v_cache: list[Tensor]) -> None:
        """(Re)build the C structs for these KV caches: one ``[B, KV, maxlen, D]`` float32 contiguous CPU tensor
        per layer in each list, every layer with the same ``B`` and ``maxlen``. Raises
        :class:`awqkit.errors.KernelInputError` for anything else (the structs would point past the buffers)."""
        fn, n = "NativeStack.bind_caches", len(self.layers)
        if len(k_cache) != n or len(v_cache) != n:
            raise KernelInputError(
                f"{fn}: KV caches k_cache ({len(k_cache)} tensors) / v_cache ({len(v_cache)} "
                f"tensors) do not match the {n} layers, expected one cache of each per layer"
            )
        batch: int | None = None
        maxlen: int | None = None
        for i, (lay, kc, vc) in enumerate(zip(self.layers, k_cache, v_cache, strict=True)):
            sh = lay.shape
            maxlen = check_kv_caches(
                fn,
                kc,
                vc,
                batch=batch,
                kv_heads=sh.kv_heads,
                head_dim=sh.head_dim,
                maxlen=maxlen,
                names=(f"k_cache[{i}]", f"v_cache[{i}]"),
            )
            batch = kc.shape[0]  # every later layer: layer 0's batch and length
        arr = (_LayerStruct * n)()
        for s, lay, kc, vc in zip(arr, self.layers, k_cache, v_cache, strict=True):
            sh = lay.shape
            s.qkv, s.o, s.gu, s.down = (_linear(op) for op in (lay.qkv, lay.o, lay.gate_up, lay.down))
            s.in_norm, s.post_norm = lay.in_norm.data_ptr(), lay.post_norm.data_ptr()
            s.q_norm, s.k_norm = _ptr(lay.q_norm), _ptr(lay.k_norm)
            s.kc, s.vc = kc.data_ptr(), vc.data_ptr()
            s.eps, s.norm_eps, s.scale = lay.eps, sh.norm_eps, sh.scale
            s.H, s.KV, s.D, s.maxlen, s.window = sh.heads, sh.kv_heads, sh.head_dim, kc.shape[2], sh.window
        self.structs, self.maxlen, self.batch = arr, int(maxlen or 0), int(batch or 0)
        # the pointed-to tensors (kept alive here) and what the structs hold of them, re-checked every step
        self._bound = [
            (kc, vc, kc.data_ptr(), vc.data_ptr(), tuple(kc.shape)) for kc, vc in zip(k_cache, v_cache, strict=True)
        ]

    def __call__(self, h: Tensor, pos: int, cos: Tensor, sin: Tensor) -> Tensor:
        """One decode step on the residual stream ``h [B, 1, hidden]`` (float32, contiguous, CPU), in place, at
        position ``0 <= pos < maxlen``; ``B <= MAX_ROWS`` and equal to the bound caches' batch; ``cos``/``sin``
        ``[B, 1, D]`` float32. Raises :class:`awqkit.errors.KernelInputError` for anything else."""
        if self.structs is None:
            raise RuntimeError("NativeStack.bind_caches() was not called")
        fn, lay = "NativeStack", self.layers[0]
        if isinstance(h, Tensor) and h.dim() == 3:
            check_rows(fn, "h", h.shape[0], cpu_avx2.MAX_ROWS)
        b = self.batch
        check_tensor(fn, "h", h, shape=(b, 1, self.hidden), what="[B, 1, hidden] with B = the KV caches' batch")
        check_position(fn, pos, 1, self.maxlen)
        check_rope(fn, cos, sin, batch=b, head_dim=lay.shape.head_dim)
        for i, (kc, vc, kp, vp, shape) in enumerate(self._bound):  # ~0.3 us a layer
            if (
                kc.data_ptr() != kp
                or vc.data_ptr() != vp
                or kc.shape != shape
                or vc.shape != shape
                or not (kc.is_contiguous() and vc.is_contiguous())
            ):
                raise KernelInputError(
                    f"{fn}: KV caches k_cache[{i}] {tuple(kc.shape)} / v_cache[{i}] {tuple(vc.shape)} do not match "
                    f"the {shape} contiguous buffers bind_caches() bound (changed in place since), expected "
                    "bind_caches() again after reallocating the caches"
                )
        scratch = torch.empty(b * (self._width + lay.shape.heads * self.maxlen), dtype=torch.float32)
        native.loaded().awqkit_decode_layers(
            ctypes.addressof(self.structs),
            len(self.layers),
            h.data_ptr(),
            b,
            self.hidden,
            pos,
            cos.data_ptr(),
            sin.data_ptr(),
            scratch.data_ptr(),
            torch.get_num_threads(),
        )
        return h


__all__ = ["NativeStack", "unsupported_reason"]
