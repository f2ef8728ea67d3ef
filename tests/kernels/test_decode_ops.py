"""awqkit.kernels.decode_ops: the native decoder ops against their torch references, and the reference
attention against a plain eager formula (repeat the KV heads, mask, softmax) written out here.

Tolerance: native vs reference differ only by fp32 summation order: max abs error <= 2e-5 of the
output's largest magnitude (rtol 1e-5 for the elementwise ops)."""

from __future__ import annotations

import math

import pytest
import torch

from awqkit.kernels import decode_ops, native
from awqkit.kernels.decode_ops import AttentionShape

needs_native = pytest.mark.skipif(native.library() is None, reason=f"native kernels: {native.unavailable_reason()}")


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 2e-5) -> None:
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= rel * max(b.abs().max().item(), 1e-6), f"max abs error {err}"


@needs_native
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("rows,n", [(1, 64), (3, 576), (7, 40)])
def test_rms_norm_native_matches_reference(offset, rows, n):
    g = torch.Generator().manual_seed(rows * n)
    x = torch.randn(rows, 1, n, generator=g) * 3
    w = torch.randn(n, generator=g)
    ref = decode_ops.rms_norm(x, w, 1e-5, offset, native_flag=False)
    out = decode_ops.rms_norm(x, w, 1e-5, offset, native_flag=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # the reference is transformers' formula
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * (offset + w)
    torch.testing.assert_close(ref, expected, rtol=1e-6, atol=1e-6)


@needs_native
def test_silu_mul_native_matches_reference():
    gu = torch.randn(5, 1, 2 * 96, generator=torch.Generator().manual_seed(1)) * 4
    ref = decode_ops.silu_mul(gu, native_flag=False)
    torch.testing.assert_close(ref, torch.nn.functional.silu(gu[..., :96]) * gu[..., 96:])
    torch.testing.assert_close(decode_ops.silu_mul(gu, native_flag=True), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not even"):
        decode_ops.silu_mul(torch.zeros(1, 5))


def _rope_tables(b: int, positions: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = positions.float().unsqueeze(-1) * inv  # [T, D/2]
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos().expand(b, -1, -1).contiguous(), emb.sin().expand(b, -1, -1).contiguous()


def _eager(q, k_all, v_all, positions, shape):
    """Plain attention over the full key list (no cache): repeat KV heads, causal (+ window) mask."""
    b, t, _ = q.shape
    h, kv, d = shape.heads, shape.kv_heads, shape.head_dim
    qh = q.view(b, t, h, d).transpose(1, 2)
    kh = k_all.repeat_interleave(h // kv, dim=1)
    vh = v_all.repeat_interleave(h // kv, dim=1)
    scores = qh @ kh.transpose(-1, -2) * shape.scale
    kpos = torch.arange(k_all.shape[2])
    mask = kpos.unsqueeze(0) <= positions.unsqueeze(1)
    if shape.window:
        mask &= kpos.unsqueeze(0) > positions.unsqueeze(1) - shape.window
    scores = scores.masked_fill(~mask, -math.inf)
    return (scores.softmax(-1) @ vh).transpose(1, 2).reshape(b, t, h * d)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_reference_attention_matches_eager_formula(window, qk_norm):
    """Prefill 6 positions, then 3 more at once, then 1: every output equals plain attention over all keys."""
    b, h, kv, d = 2, 4, 2, 16
    shape = AttentionShape(h, kv, d, d**-0.5, window, 1e-6)
    g = torch.Generator().manual_seed(7)
    n = 10
    q = torch.randn(b, n, h * d, generator=g)
    k = torch.randn(b, n, kv * d, generator=g)
    v = torch.randn(b, n, kv * d, generator=g)
    qn = torch.rand(d, generator=g) + 0.5 if qk_norm else None
    kn = torch.rand(d, generator=g) + 0.5 if qk_norm else None
    cos, sin = _rope_tables(b, torch.arange(n), d)
    kc, vc = torch.zeros(b, kv, 16, d), torch.zeros(b, kv, 16, d)
    outs = []
    for lo, hi in ((0, 6), (6, 9), (9, 10)):
        outs.append(
            decode_ops.attention_reference(
                q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], kc, vc, lo, cos[:, lo:hi], sin[:, lo:hi], shape, qn, kn
            )
        )
    out = torch.cat(outs, dim=1)

    def norm(x, w):
        return x if w is None else w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    qr = _rotate(norm(q.view(b, n, h, d), qn).transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1))
    kr = _rotate(norm(k.view(b, n, kv, d), kn).transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1))
    expected = _eager(
        qr.transpose(1, 2).reshape(b, n, h * d), kr, v.view(b, n, kv, d).transpose(1, 2), torch.arange(n), shape
    )
    _close(out, expected, 1e-5)
    _close(kc[:, :, :n], kr, 1e-6)


@needs_native
@pytest.mark.parametrize("b,h,kv,d", [(1, 9, 3, 64), (3, 4, 4, 32), (2, 8, 2, 128)])
@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_native_decode_attention_matches_reference(b, h, kv, d, window, qk_norm):
    shape = AttentionShape(h, kv, d, 0.7 * d**-0.5, window, 1e-6)
    g = torch.Generator().manual_seed(b * h + d)
    maxlen, pos = 32, 19
    kc = torch.randn(b, kv, maxlen, d, generator=g)
    vc = torch.randn(b, kv, maxlen, d, generator=g)
    q = torch.randn(b, 1, h * d, generator=g)
    k = torch.randn(b, 1, kv * d, generator=g)
    v = torch.randn(b, 1, kv * d, generator=g)
    qn = torch.rand(d, generator=g) + 0.5 if qk_norm else None
    kn = torch.rand(d, generator=g) + 0.5 if qk_norm else None
    cos, sin = _rope_tables(b, torch.tensor([pos]), d)
    kc2, vc2 = kc.clone(), vc.clone()
    ref = decode_ops.attention(q, k, v, kc, vc, pos, cos, sin, shape, qn, kn, native_flag=False)
    out = decode_ops.attention(q, k, v, kc2, vc2, pos, cos, sin, shape, qn, kn, native_flag=True)
    _close(out, ref)
    _close(kc2, kc, 1e-6)  # the new key written at pos (rotated, normed), the rest untouched
    assert torch.equal(vc2, vc)
    # the fused entry point consumes a [q | k | v] buffer and gives the same
    kc3, vc3 = kc.clone(), vc.clone()
    kc3[:, :, pos] = 0
    fused = decode_ops.attention_fused(
        torch.cat((q, k, v), -1).view(b, -1).contiguous(), kc3, vc3, pos, cos, sin, shape, qn, kn
    )
    _close(fused, out, 1e-6)


def test_attention_checks_shapes_and_capacity():
    shape = AttentionShape(4, 2, 8, 0.3)
    kc, vc = torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8)
    cos, sin = torch.ones(1, 1, 8), torch.zeros(1, 1, 8)
    q, k = torch.zeros(1, 1, 32), torch.zeros(1, 1, 16)
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        decode_ops.attention(q, k, k, kc, vc, 4, cos, sin, shape)
    with pytest.raises(ValueError, match="do not match heads"):
        decode_ops.attention(torch.zeros(1, 1, 24), k, k, kc, vc, 0, cos, sin, shape)
    with pytest.raises(ValueError, match="KV caches"):
        decode_ops.attention(q, k, k, torch.zeros(1, 4, 4, 8), vc, 0, cos, sin, shape)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        AttentionShape(3, 2, 8, 0.3)
    with pytest.raises(ValueError, match="weight shape"):
        decode_ops.rms_norm(torch.zeros(2, 8), torch.ones(4), 1e-6)
