"""The non-matmul work of a decoder step: RMSNorm, SiLU-gated product, grouped-query attention over a
static KV cache. Each op has a torch reference (the oracle, any device/dtype) and, for float32 CPU tensors,
a native version in ``csrc/awqkit_cpu.c`` (one C call instead of 5-25 small torch ops; at batch-1 decode
those ops' dispatch costs more than their arithmetic). ``native=None`` picks the native version where it
applies; results equal the reference to fp32 rounding (different summation order).

Shapes (``R`` rows = batch x new tokens, ``H`` query heads, ``KV`` key/value heads, ``D`` head dim):

* :func:`rms_norm`: ``x [..., n]``, ``weight [n]`` -> ``[..., n]``;
  ``(x * rsqrt(mean(x^2) + eps)) * (offset + weight)`` (transformers' Llama/Qwen RMSNorm; Gemma's is offset 1).
* :func:`silu_mul`: ``gu [..., 2n]`` (a fused ``[gate | up]`` output) -> ``silu(gate) * up [..., n]``.
* :func:`attention`: ``q [B, T, H*D]``, ``k``/``v [B, T, KV*D]`` for positions ``pos .. pos+T-1``, caches
  ``[B, KV, maxlen, D]``; optional per-head RMSNorm of q/k (Qwen3's ``q_norm``/``k_norm``), rotary
  embedding (``cos``/``sin [B, T, D]``, transformers' ``rotate_half`` convention), write k/v into the caches,
  causal softmax attention (``scale``; a sliding ``window`` > 0 sees the last ``window`` positions) ->
  ``[B, T, H*D]``. The native version takes decode steps (``T == 1``) with ``D % 8 == 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from awqkit.kernels import native

_F32 = torch.float32


def _native_ok(native_flag: bool | None, *tensors: Tensor) -> bool:
    if native_flag is False:
        return False
    ok = native.library() is not None and all(
        t.is_cpu and t.dtype is _F32 and t.is_contiguous() for t in tensors)
    if native_flag and not ok:
        raise ValueError("native=True needs the native CPU kernels and contiguous float32 CPU tensors "
                         f"({native.unavailable_reason() or 'a tensor is not contiguous float32 on CPU'})")
    return ok


def rms_norm(x: Tensor, weight: Tensor, eps: float, offset: float = 0.0, native_flag: bool | None = None) -> Tensor:
    """RMSNorm over the last dim; see the module docstring. ``x [..., n]``, ``weight [n]``."""
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match x's last dim {n}")
    if _native_ok(native_flag, x, weight):
        y = torch.empty_like(x)
        native.library().awqkit_rmsnorm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // n, n, eps, offset)
        return y
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return ((offset + weight.float()) * y).to(x.dtype) if offset else (weight * y.to(x.dtype))


def silu_mul(gu: Tensor, native_flag: bool | None = None) -> Tensor:
    """``silu(gate) * up`` of a fused ``gu [..., 2n]`` output -> ``[..., n]``."""
    if gu.shape[-1] % 2:
        raise ValueError(f"silu_mul: last dim {gu.shape[-1]} is not even (expected a [gate | up] concatenation)")
    n = gu.shape[-1] // 2
    if _native_ok(native_flag, gu):
        y = torch.empty(gu.shape[:-1] + (n,), dtype=_F32)
        native.library().awqkit_silu_mul(gu.data_ptr(), y.data_ptr(), gu.numel() // (2 * n), n)
        return y
    gate, up = gu.split(n, dim=-1)
    return torch.nn.functional.silu(gate) * up


@dataclass(frozen=True)
class AttentionShape:
    """Head layout of one attention module: ``heads`` query heads, ``kv_heads`` key/value heads of
    ``head_dim``; ``scale`` multiplies q.k; ``window`` > 0: sliding window of that many positions;
    ``norm_eps``: eps of the per-head q/k norms (when the model has them)."""

    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    window: int = 0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.heads < 1 or self.kv_heads < 1 or self.heads % self.kv_heads or self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"attention shape {self}: heads must be a multiple of kv_heads and head_dim even")


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _head_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    return x if weight is None else rms_norm(x, weight, eps, native_flag=False)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int,
                        cos: Tensor, sin: Tensor, shape: AttentionShape, q_norm: Tensor | None = None,
                        k_norm: Tensor | None = None) -> Tensor:
    """The torch reference of :func:`attention` (any T, device, dtype); writes the caches in place."""
    b, t, _ = q.shape
    h, kv, d = shape.heads, shape.kv_heads, shape.head_dim
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]
    qh = _rotate(_head_norm(q.view(b, t, h, d), q_norm, shape.norm_eps).transpose(1, 2), c, s)
    kh = _rotate(_head_norm(k.view(b, t, kv, d), k_norm, shape.norm_eps).transpose(1, 2), c, s)
    k_cache[:, :, pos:pos + t] = kh
    v_cache[:, :, pos:pos + t] = v.view(b, t, kv, d).transpose(1, 2)
    end = pos + t
    start = max(0, end - t - shape.window + 1) if shape.window > 0 else 0
    keys, values = k_cache[:, :, start:end], v_cache[:, :, start:end]
    if start == pos and (shape.window == 0 or shape.window >= t):  # plain causal (a prompt from position 0)
        mask, causal = None, t > 1
    else:
        qpos = torch.arange(pos, end, device=q.device).unsqueeze(1)
        kpos = torch.arange(start, end, device=q.device).unsqueeze(0)
        mask, causal = kpos <= qpos, False
        if shape.window > 0:
            mask &= kpos > qpos - shape.window
    out = torch.nn.functional.scaled_dot_product_attention(
        qh, keys, values, attn_mask=mask, is_causal=causal, scale=shape.scale, enable_gqa=kv != h)
    return out.transpose(1, 2).reshape(b, t, h * d)


def attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int, cos: Tensor,
              sin: Tensor, shape: AttentionShape, q_norm: Tensor | None = None, k_norm: Tensor | None = None,
              native_flag: bool | None = None) -> Tensor:
    """Attention of ``T`` new positions starting at ``pos`` (see the module docstring); writes the caches."""
    b, t, _ = q.shape
    h, kv, d = shape.heads, shape.kv_heads, shape.head_dim
    maxlen = k_cache.shape[2]
    if k_cache.shape != (b, kv, maxlen, d) or v_cache.shape != k_cache.shape:
        raise ValueError(f"KV caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not match [B={b}, KV={kv}, "
                         f"maxlen, D={d}]")
    if pos < 0 or pos + t > maxlen:
        raise ValueError(f"positions {pos}..{pos + t - 1} do not fit the KV cache of {maxlen} positions")
    if q.shape[-1] != h * d or k.shape[-1] != kv * d or v.shape[-1] != kv * d or cos.shape != (b, t, d):
        raise ValueError(f"attention inputs q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, cos "
                         f"{tuple(cos.shape)} do not match heads={h}, kv_heads={kv}, head_dim={d}")
    norms = [w for w in (q_norm, k_norm) if w is not None]
    if t != 1 or d % 8 or not _native_ok(native_flag, k_cache, v_cache, cos, sin, *norms):
        return attention_reference(q, k, v, k_cache, v_cache, pos, cos, sin, shape, q_norm, k_norm)
    qkv = torch.cat((q, k, v), dim=-1).to(_F32).reshape(b, -1)  # a private copy: the kernel ropes it in place
    out = torch.empty(b, h * d, dtype=_F32)
    return _native_attention(qkv, k_cache, v_cache, pos, cos, sin, shape, q_norm, k_norm, out).view(b, 1, h * d)


def attention_fused(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int, cos: Tensor, sin: Tensor,
                    shape: AttentionShape, q_norm: Tensor | None = None, k_norm: Tensor | None = None) -> Tensor:
    """Native decode-step attention from a fused ``qkv [B, (H + 2 KV) * D]`` float32 buffer (consumed: q and
    k are normed and rotated in place) -> ``[B, 1, H * D]``. Callers check shapes once (:func:`attention`
    does, per call); this is the per-step path of :mod:`awqkit.runtime.decoder`."""
    b = qkv.shape[0]
    out = torch.empty(b, shape.heads * shape.head_dim, dtype=_F32)
    return _native_attention(qkv, k_cache, v_cache, pos, cos, sin, shape, q_norm, k_norm, out).view(b, 1, -1)


def _native_attention(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int, cos: Tensor, sin: Tensor,
                      shape: AttentionShape, q_norm: Tensor | None, k_norm: Tensor | None, out: Tensor) -> Tensor:
    b, maxlen = qkv.shape[0], k_cache.shape[2]
    scratch = torch.empty(b * shape.heads * maxlen, dtype=_F32)
    native.library().awqkit_decode_attention(
        qkv.data_ptr(), qkv.shape[1], k_cache.data_ptr(), v_cache.data_ptr(), cos.data_ptr(), sin.data_ptr(),
        q_norm.data_ptr() if q_norm is not None else None, k_norm.data_ptr() if k_norm is not None else None,
        shape.norm_eps, out.data_ptr(), scratch.data_ptr(), b, shape.heads, shape.kv_heads, shape.head_dim, pos,
        maxlen, shape.window, shape.scale, torch.get_num_threads())
    return out


__all__ = ["AttentionShape", "attention", "attention_fused", "attention_reference", "rms_norm", "silu_mul"]
