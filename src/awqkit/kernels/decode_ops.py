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

from awqkit.errors import KernelInputError
from awqkit.kernels import native
from awqkit.kernels._native_checks import check_decode_attention, check_optional, check_position, fail

_F32 = torch.float32
_STRIDED = torch.strided


def _native_ok(native_flag: bool | None, fn: str, named: tuple[tuple[str, Tensor | None], ...]) -> bool:
    """Whether ``fn`` runs natively: ``native_flag`` None picks the native kernel when the library loads and
    every named tensor (None: absent) is dense contiguous float32 on CPU, else the torch reference; True
    requires it (:class:`awqkit.errors.KernelInputError` naming the first tensor that is not, ValueError
    when the library is unavailable); False never."""
    if native_flag is False:
        return False
    ok = native.library() is not None and all(
        t is None or (t.is_cpu and t.dtype is _F32 and t.layout is _STRIDED and t.is_contiguous()) for _, t in named
    )
    if native_flag and not ok:
        if native.library() is None:
            raise ValueError(f"{fn}: native=True needs the native CPU kernels ({native.unavailable_reason()})")
        for name, t in named:
            check_optional(fn, name, t)
    return ok


def rms_norm(x: Tensor, weight: Tensor, eps: float, offset: float = 0.0, native_flag: bool | None = None) -> Tensor:
    """RMSNorm over the last dim; see the module docstring. ``x [..., n]``, ``weight [n]``."""
    fn = "decode_ops.rms_norm"
    if x.dim() == 0 or weight.shape != (x.shape[-1],):
        fail(
            fn,
            "weight",
            f"has shape {tuple(weight.shape)}",
            f"({x.shape[-1] if x.dim() else '?'},) (the weight shape must equal x's last dim)",
        )
    n = x.shape[-1]
    if n and _native_ok(native_flag, fn, (("x", x), ("weight", weight))):  # n == 0: nothing to normalize
        y = torch.empty_like(x)
        native.loaded().awqkit_rmsnorm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // n, n, eps, offset)
        return y
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return ((offset + weight.float()) * y).to(x.dtype) if offset else (weight * y.to(x.dtype))


def silu_mul(gu: Tensor, native_flag: bool | None = None) -> Tensor:
    """``silu(gate) * up`` of a fused ``gu [..., 2n]`` output -> ``[..., n]``."""
    if gu.dim() == 0 or gu.shape[-1] % 2:
        fail(
            "decode_ops.silu_mul",
            "gu",
            f"has shape {tuple(gu.shape)}",
            "(..., 2n) (a [gate | up] concatenation; its last dim is not even)",
        )
    n = gu.shape[-1] // 2
    if n and _native_ok(native_flag, "decode_ops.silu_mul", (("gu", gu),)):  # n == 0: an empty result
        y = torch.empty(gu.shape[:-1] + (n,), dtype=_F32)
        native.loaded().awqkit_silu_mul(gu.data_ptr(), y.data_ptr(), gu.numel() // (2 * n), n)
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


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: int,
    cos: Tensor,
    sin: Tensor,
    shape: AttentionShape,
    q_norm: Tensor | None = None,
    k_norm: Tensor | None = None,
) -> Tensor:
    """The torch reference of :func:`attention` (any T, device, dtype); writes the caches in place."""
    b, t, _ = q.shape
    h, kv, d = shape.heads, shape.kv_heads, shape.head_dim
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]
    qh = _rotate(_head_norm(q.view(b, t, h, d), q_norm, shape.norm_eps).transpose(1, 2), c, s)
    kh = _rotate(_head_norm(k.view(b, t, kv, d), k_norm, shape.norm_eps).transpose(1, 2), c, s)
    k_cache[:, :, pos : pos + t] = kh
    v_cache[:, :, pos : pos + t] = v.view(b, t, kv, d).transpose(1, 2)
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
        qh, keys, values, attn_mask=mask, is_causal=causal, scale=shape.scale, enable_gqa=kv != h
    )
    return out.transpose(1, 2).reshape(b, t, h * d)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: int,
    cos: Tensor,
    sin: Tensor,
    shape: AttentionShape,
    q_norm: Tensor | None = None,
    k_norm: Tensor | None = None,
    native_flag: bool | None = None,
) -> Tensor:
    """Attention of ``T`` new positions starting at ``pos`` (see the module docstring); writes the caches."""
    fn = "decode_ops.attention"
    if q.dim() != 3:
        fail(fn, "q", f"has shape {tuple(q.shape)}", "[B, T, H*D] (3 dims)")
    b, t, _ = q.shape
    h, kv, d = shape.heads, shape.kv_heads, shape.head_dim
    maxlen = k_cache.shape[2] if k_cache.dim() == 4 else -1
    if k_cache.shape != (b, kv, maxlen, d) or v_cache.shape != k_cache.shape:
        raise KernelInputError(
            f"{fn}: KV caches k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} "
            f"do not match [B={b}, KV={kv}, maxlen, D={d}], expected two caches of that shape"
        )
    check_position(fn, pos, t, maxlen)
    heads = f"inputs do not match heads={h}, kv_heads={kv}, head_dim={d}"
    for name, x, width in (("q", q, h * d), ("k", k, kv * d), ("v", v, kv * d), ("cos", cos, d), ("sin", sin, d)):
        if x.shape != (b, t, width):
            fail(fn, name, f"has shape {tuple(x.shape)}", f"{(b, t, width)} ({heads})")
    named = (
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("cos", cos),
        ("sin", sin),
        ("q_norm", q_norm),
        ("k_norm", k_norm),
    )
    if t != 1 or d % 8 or not _native_ok(native_flag, fn, named):
        return attention_reference(q, k, v, k_cache, v_cache, pos, cos, sin, shape, q_norm, k_norm)
    qkv = torch.cat((q, k, v), dim=-1).to(_F32).reshape(b, -1)  # a private copy: the kernel ropes it in place
    return _native_attention(qkv, k_cache, v_cache, pos, cos, sin, shape, q_norm, k_norm, fn).view(b, 1, h * d)


def attention_fused(
    qkv: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: int,
    cos: Tensor,
    sin: Tensor,
    shape: AttentionShape,
    q_norm: Tensor | None = None,
    k_norm: Tensor | None = None,
) -> Tensor:
    """Native decode-step attention from a fused ``qkv [B, (H + 2 KV) * D]`` float32 buffer (consumed: q and
    k are normed and rotated in place) -> ``[B, 1, H * D]``; the per-step path of :mod:`awqkit.runtime.decoder`.
    Every input is checked as :func:`awqkit.kernels._native_checks.check_decode_attention` says
    (:class:`awqkit.errors.KernelInputError`)."""
    out = _native_attention(qkv, k_cache, v_cache, pos, cos, sin, shape, q_norm, k_norm, "decode_ops.attention_fused")
    return out.view(out.shape[0], 1, -1)


def _native_attention(
    qkv: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: int,
    cos: Tensor,
    sin: Tensor,
    shape: AttentionShape,
    q_norm: Tensor | None,
    k_norm: Tensor | None,
    fn: str,
) -> Tensor:
    """``awqkit_decode_attention`` -> ``out [B, H * D]`` after checking everything it reads and writes."""
    h, d = shape.heads, shape.head_dim
    maxlen = check_decode_attention(
        fn, qkv, k_cache, v_cache, pos, cos, sin, q_norm, k_norm, heads=h, kv_heads=shape.kv_heads, head_dim=d
    )
    b = qkv.shape[0]
    out = torch.empty(b, h * d, dtype=_F32)  # [B, H * D] and B * H * maxlen floats, from the checked sizes
    scratch = torch.empty(b * h * maxlen, dtype=_F32)
    native.loaded().awqkit_decode_attention(
        qkv.data_ptr(),
        qkv.shape[1],
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        q_norm.data_ptr() if q_norm is not None else None,
        k_norm.data_ptr() if k_norm is not None else None,
        shape.norm_eps,
        out.data_ptr(),
        scratch.data_ptr(),
        b,
        h,
        shape.kv_heads,
        d,
        pos,
        maxlen,
        shape.window,
        shape.scale,
        torch.get_num_threads(),
    )
    return out


__all__ = ["AttentionShape", "attention", "attention_fused", "attention_reference", "rms_norm", "silu_mul"]
