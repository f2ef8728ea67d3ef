"""The whole decoder stack of a decode step as one native call (``awqkit_decode_layers`` in
``kernels/csrc/awqkit_cpu.c``).

When every linear of every layer is a fused ``cpu-avx2`` op (:class:`awqkit.runtime.linear.FusedInt4`) and
attention can run natively (``head_dim % 8 == 0``), :class:`NativeStack` describes the layers once as C
structs (pointers to the converted weights, norms and KV caches; sizes) and a decode step of ``B <=
MAX_ROWS`` rows becomes one ctypes call instead of ~9 per layer. The C function calls the same kernels in
the same order as :class:`awqkit.runtime.decoder.Decoder`'s per-op path, so the results are the same to the
bit (tested); what it saves is the Python and dispatch time between the kernels (~4 ms a token on
SmolLM2-135M, 30 layers).

The structs hold raw pointers: :meth:`NativeStack.bind_caches` must be called whenever the KV caches are
(re)allocated, and the stack keeps references to every tensor it points to.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from awqkit.kernels import cpu_avx2, native
from awqkit.runtime.linear import FusedInt4

if TYPE_CHECKING:
    from awqkit.runtime.decoder import _Layer

_P, _I64, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _Linear(ctypes.Structure):
    _fields_ = [("wq", _P), ("sp", _P), ("zq", _P), ("bias", _P), ("K", _I64), ("N", _I64), ("group", _I64)]


class _LayerStruct(ctypes.Structure):
    _fields_ = [("qkv", _Linear), ("o", _Linear), ("gu", _Linear), ("down", _Linear),
                ("in_norm", _P), ("post_norm", _P), ("q_norm", _P), ("k_norm", _P), ("kc", _P), ("vc", _P),
                ("eps", _F), ("norm_eps", _F), ("scale", _F),
                ("H", _I64), ("KV", _I64), ("D", _I64), ("maxlen", _I64), ("window", _I64)]


def _ptr(t: Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _linear(op: FusedInt4) -> _Linear:
    c = op.cache
    return _Linear(c.wq.data_ptr(), c.sp.data_ptr(), c.zq.data_ptr(), _ptr(c.bias), c.wq.shape[1],
                   c.wq.shape[0] * cpu_avx2.BLOCK_N, c.group_size)


def unsupported_reason(layers: list[_Layer], hidden: int) -> str | None:
    """Why the stack cannot run these layers as one native call (None when it can)."""
    if native.library() is None:
        return f"native kernels unavailable ({native.unavailable_reason()})"
    first = layers[0]
    for i, lay in enumerate(layers):
        ops = (lay.qkv, lay.o, lay.gate_up, lay.down)
        if lay.shape.heads != first.shape.heads or lay.gate_up.out_features != first.gate_up.out_features:
            return f"layer {i} differs in heads or MLP width from layer 0 (the scratch layout assumes one shape)"
        if not all(isinstance(op, FusedInt4) for op in ops):
            return f"layer {i} has linears that are not cpu-avx2 int4"
        sh = lay.shape
        if sh.head_dim % 8:
            return f"head_dim {sh.head_dim} is not a multiple of 8"
        if (lay.qkv.in_features, lay.o.out_features, lay.gate_up.in_features, lay.down.out_features) != (hidden,) * 4:
            return f"layer {i}: projections do not map hidden size {hidden} to itself"
        if lay.o.in_features != sh.heads * sh.head_dim or lay.down.in_features * 2 != lay.gate_up.out_features:
            return f"layer {i}: o/down input sizes do not match attention heads / the gate-up width"
        if any(t is not None and (t.dtype != torch.float32 or not t.is_contiguous())
               for t in (lay.in_norm, lay.post_norm, lay.q_norm, lay.k_norm)):
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
        self.maxlen = 0
        lay = layers[0]
        self._width = (hidden + lay.qkv.out_features + lay.shape.heads * lay.shape.head_dim
                       + lay.gate_up.out_features + lay.gate_up.out_features // 2)

    def bind_caches(self, k_cache: list[Tensor], v_cache: list[Tensor]) -> None:
        """(Re)build the C structs for these KV caches (``[B, KV, maxlen, D]`` float32, one per layer)."""
        arr = (_LayerStruct * len(self.layers))()
        for s, lay, kc, vc in zip(arr, self.layers, k_cache, v_cache):
            sh = lay.shape
            s.qkv, s.o, s.gu, s.down = (_linear(op) for op in (lay.qkv, lay.o, lay.gate_up, lay.down))
            s.in_norm, s.post_norm = lay.in_norm.data_ptr(), lay.post_norm.data_ptr()
            s.q_norm, s.k_norm = _ptr(lay.q_norm), _ptr(lay.k_norm)
            s.kc, s.vc = kc.data_ptr(), vc.data_ptr()
            s.eps, s.norm_eps, s.scale = lay.eps, sh.norm_eps, sh.scale
            s.H, s.KV, s.D, s.maxlen, s.window = sh.heads, sh.kv_heads, sh.head_dim, kc.shape[2], sh.window
        self.structs, self.maxlen = arr, k_cache[0].shape[2]
        self._caches = (k_cache, v_cache)  # keep the pointed-to tensors alive

    def __call__(self, h: Tensor, pos: int, cos: Tensor, sin: Tensor) -> Tensor:
        """One decode step on the residual stream ``h [B, 1, hidden]`` (float32, contiguous), in place."""
        if self.structs is None:
            raise RuntimeError("NativeStack.bind_caches() was not called")
        b = h.shape[0]
        scratch = torch.empty(b * (self._width + self.layers[0].shape.heads * self.maxlen), dtype=torch.float32)
        native.library().awqkit_decode_layers(
            ctypes.addressof(self.structs), len(self.layers), h.data_ptr(), b, self.hidden, pos, cos.data_ptr(),
            sin.data_ptr(), scratch.data_ptr(), torch.get_num_threads())
        return h


__all__ = ["NativeStack", "unsupported_reason"]
