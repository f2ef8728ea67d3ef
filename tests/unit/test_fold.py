"""fold_scales is an equivalence transform for every kind of mapping; apply_clip clamps per group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from awqkit.algo.fold import apply_clip, fold_scales

transformers = pytest.importorskip("transformers")
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

D = 64
RTOL = 1e-5


def _scales(n: int, seed: int = 0) -> torch.Tensor:
    """Positive scales log-uniform over [0.1, 10], with both ends present."""
    g = torch.Generator().manual_seed(seed)
    s = torch.exp(torch.empty(n).uniform_(-2.302585, 2.302585, generator=g))
    s[0], s[-1] = 0.1, 10.0
    return s


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _linears(in_f: int, seed: int = 2) -> list[nn.Linear]:
    torch.manual_seed(seed)
    return [nn.Linear(in_f, 32, bias=True), nn.Linear(in_f, 48, bias=False), nn.Linear(in_f, 16, bias=True)]


def _randomize(norm: nn.Module, seed: int = 3, bias: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=g) * 0.5 + 1.0)
        if bias:
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g) * 0.3)


def _check_norm_fold(norm: nn.Module, offset: float) -> None:
    lins = _linears(D)
    x = _x(3, 7, D)
    with torch.no_grad():
        before = [lin(norm(x)) for lin in lins]
        w_before = [lin.weight.clone() for lin in lins]
    s = _scales(D)
    fold_scales(norm, lins, s, norm_offset=offset)
    with torch.no_grad():
        after = [lin(norm(x)) for lin in lins]
    for a, b in zip(after, before, strict=True):
        assert _rel(a, b) < RTOL
    # The consumers' columns were really multiplied by s (the check above is not vacuous).
    for lin, w0 in zip(lins, w_before, strict=True):
        torch.testing.assert_close(lin.weight, w0 * s, rtol=1e-6, atol=0)


def test_fold_llama_rmsnorm_preserves_output():
    norm = LlamaRMSNorm(D)
    _randomize(norm)
    w0 = norm.weight.detach().clone()
    _check_norm_fold(norm, 0.0)
    torch.testing.assert_close(norm.weight, w0 / _scales(D), rtol=1e-6, atol=0)


def test_fold_layernorm_with_bias_preserves_output():
    norm = nn.LayerNorm(D)
    _randomize(norm, bias=True)
    b0 = norm.bias.detach().clone()
    _check_norm_fold(norm, 0.0)
    torch.testing.assert_close(norm.bias, b0 / _scales(D), rtol=1e-6, atol=0)


def test_fold_gemma3_rmsnorm_with_offset_one_preserves_output():
    norm = Gemma3RMSNorm(D)
    _randomize(norm)  # (1 + w) spans roughly [0.5, 3.5]: both signs of w
    _check_norm_fold(norm, 1.0)


def test_fold_gemma3_rmsnorm_with_offset_zero_breaks_output():
    """Using Llama's fold (w / s) on Gemma's (1 + w) norm changes the output: the offset matters."""
    errs = {}
    for offset in (1.0, 0.0):
        norm = Gemma3RMSNorm(D)
        _randomize(norm)
        lins = _linears(D)
        x = _x(3, 7, D)
        with torch.no_grad():
            before = lins[0](norm(x))
        fold_scales(norm, lins, _scales(D), norm_offset=offset)
        with torch.no_grad():
            errs[offset] = _rel(lins[0](norm(x)), before)
    assert errs[1.0] < RTOL
    assert errs[0.0] > 0.1
    assert errs[0.0] > 1e4 * errs[1.0]


def test_fold_linear_into_linear_preserves_output():
    """v -> o style: prev linear's output rows (and bias) / s, consumer columns * s."""
    torch.manual_seed(4)
    prev = nn.Linear(48, D, bias=True)
    consumers = [nn.Linear(D, 32, bias=True)]
    x = _x(5, 48)
    with torch.no_grad():
        before = consumers[0](prev(x))
        w0, b0 = prev.weight.clone(), prev.bias.clone()
    s = _scales(D)
    fold_scales(prev, consumers, s)
    with torch.no_grad():
        after = consumers[0](prev(x))
    assert _rel(after, before) < RTOL
    torch.testing.assert_close(prev.weight, w0 / s.unsqueeze(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(prev.bias, b0 / s, rtol=1e-6, atol=0)


def test_fold_into_fused_linear_scales_only_last_rows():
    """A prev linear with more outputs than scales (fused qkv feeding its v part) scales its last rows."""
    torch.manual_seed(5)
    prev = nn.Linear(48, 32 + D, bias=True)
    consumer = nn.Linear(D, 16, bias=False)
    x = _x(5, 48)
    with torch.no_grad():
        before = consumer(prev(x)[..., -D:])
        head_w, head_b = prev.weight[:32].clone(), prev.bias[:32].clone()
    fold_scales(prev, [consumer], _scales(D))
    with torch.no_grad():
        after = consumer(prev(x)[..., -D:])
    assert _rel(after, before) < RTOL
    assert torch.equal(prev.weight[:32], head_w) and torch.equal(prev.bias[:32], head_b)


def test_fold_identity_scales_is_a_no_op():
    norm = LlamaRMSNorm(D)
    _randomize(norm)
    lins = _linears(D)
    w0 = norm.weight.detach().clone()
    lw0 = [lin.weight.detach().clone() for lin in lins]
    fold_scales(norm, lins, torch.ones(D))
    assert torch.equal(norm.weight, w0)
    assert all(torch.equal(lin.weight, w) for lin, w in zip(lins, lw0, strict=True))


@pytest.mark.parametrize(
    "bad",
    [
        torch.ones(D - 1),  # wrong size
        torch.ones(1, D),  # 2-D
        torch.ones(D, 1),
        torch.cat([torch.ones(D - 1), torch.zeros(1)]),  # zero
        torch.cat([torch.ones(D - 1), -torch.ones(1)]),  # negative
        torch.cat([torch.ones(D - 1), torch.tensor([float("nan")])]),
        torch.cat([torch.ones(D - 1), torch.tensor([float("inf")])]),
    ],
    ids=["short", "row", "column", "zero", "negative", "nan", "inf"],
)
def test_fold_rejects_bad_scales_and_leaves_weights_alone(bad):
    norm = LlamaRMSNorm(D)
    _randomize(norm)
    lins = _linears(D)
    w0 = norm.weight.detach().clone()
    lw0 = [lin.weight.detach().clone() for lin in lins]
    with pytest.raises(ValueError, match="scales"):
        fold_scales(norm, lins, bad)
    assert torch.equal(norm.weight, w0)
    assert all(torch.equal(lin.weight, w) for lin, w in zip(lins, lw0, strict=True))


def test_fold_rejects_prev_without_1d_weight_and_short_prev_linear():
    lins = _linears(D)
    with pytest.raises(ValueError, match="no 1-D weight"):
        fold_scales(nn.ReLU(), lins, torch.ones(D))
    with pytest.raises(ValueError, match="fewer than"):
        fold_scales(nn.Linear(8, D // 2), lins, torch.ones(D))
    with pytest.raises(ValueError, match="scales"):  # norm of the wrong width
        fold_scales(LlamaRMSNorm(D // 2), lins, torch.ones(D))


def test_apply_clip_clamps_each_group_exactly():
    torch.manual_seed(6)
    out_f, in_f, g = 8, 96, 32
    lin = nn.Linear(in_f, out_f, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f))
    w0 = lin.weight.detach().clone()
    b0 = lin.bias.detach().clone()
    n_groups = in_f // g
    gen = torch.Generator().manual_seed(7)
    lo = -torch.rand(out_f, n_groups, generator=gen)  # in [-1, 0]
    hi = torch.rand(out_f, n_groups, generator=gen)  # in [0, 1]
    apply_clip(lin, lo, hi)
    expected = w0.clone()
    for o in range(out_f):
        for k in range(n_groups):
            sl = slice(k * g, (k + 1) * g)
            expected[o, sl] = torch.clamp(w0[o, sl], lo[o, k].item(), hi[o, k].item())
    assert torch.equal(lin.weight, expected)
    assert torch.equal(lin.bias, b0)
    assert not torch.equal(lin.weight, w0)  # something was actually clamped


def test_apply_clip_with_the_original_range_changes_nothing():
    torch.manual_seed(8)
    lin = nn.Linear(64, 4, bias=False)
    w0 = lin.weight.detach().clone()
    wg = w0.reshape(4, 2, 32)
    apply_clip(lin, wg.amin(-1), wg.amax(-1))
    assert torch.equal(lin.weight, w0)


def test_apply_clip_keeps_dtype():
    lin = nn.Linear(64, 4, bias=False).half()
    bound = 2.0**-7  # exactly representable in fp16, so the clamp is exact after the cast back
    apply_clip(lin, torch.full((4, 2), -bound), torch.full((4, 2), bound))
    assert lin.weight.dtype == torch.float16
    assert lin.weight.abs().max().item() == bound


@pytest.mark.parametrize(
    "lo_shape,hi_shape",
    [((8, 3), (8, 2)), ((7, 3), (7, 3)), ((8,), (8,)), ((8, 5), (8, 5))],
    ids=["mismatch", "rows", "1-D", "not-dividing"],
)
def test_apply_clip_rejects_bad_bounds(lo_shape, hi_shape):
    lin = nn.Linear(96, 8, bias=False)
    w0 = lin.weight.detach().clone()
    with pytest.raises(ValueError):
        apply_clip(lin, torch.zeros(lo_shape), torch.ones(hi_shape))
    assert torch.equal(lin.weight, w0)
