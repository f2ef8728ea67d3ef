"""Clip search: never worse than no clipping, bounds inside the original range, helps on outliers."""

from __future__ import annotations

import pytest
import torch

from awqkit.algo.clip_search import sample_tokens, search_clip
from awqkit.quant.primitives import fake_quantize

OUT, IN, G = 48, 128, 32


def _problem(seed: int, outliers: bool = False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=gen)
    x = torch.randn(200, IN, generator=gen)
    if outliers:
        # One huge weight per (row, group), on an input channel that carries little signal
        # (what AWQ scaling leaves behind: salient channels were scaled up, quiet ones down).
        cols = [k * G + 5 for k in range(IN // G)]
        sign = torch.where(torch.rand(OUT, len(cols), generator=gen) < 0.5, -1.0, 1.0)
        w[:, cols] = 40.0 * sign
        x[:, cols] *= 0.05
    return w, x


def _group_errors(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[out, n_groups] mean over tokens of (Σ_{k∈G} x_t[k] (wq - w)[o, k])², computed with loops."""
    n_groups = w.shape[1] // G
    err = torch.empty(w.shape[0], n_groups, dtype=torch.float64)
    for k in range(n_groups):
        sl = slice(k * G, (k + 1) * G)
        diff = x[:, sl].double() @ (wq[:, sl] - w[:, sl]).double().T  # [t, out]
        err[:, k] = diff.pow(2).mean(0)
    return err


def _clamped(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    wg = w.reshape(w.shape[0], -1, G)
    return torch.clamp(wg, lo.unsqueeze(-1), hi.unsqueeze(-1)).reshape(w.shape)


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("outliers", [False, True])
def test_clip_never_increases_group_error(seed, bits, outliers):
    w, x = _problem(seed, outliers)
    w0 = w.clone()
    res = search_clip(w, x, bits=bits, group_size=G, zero_point=True, rows_per_chunk=20)  # 3 chunks, last short
    assert torch.equal(w, w0)  # the weight itself is not modified
    assert res.min_val.shape == res.max_val.shape == (OUT, IN // G)
    assert res.err_after <= res.err_before
    # independently, per (row, group): the chosen bounds are no worse than r = 1
    err_none = _group_errors(w, fake_quantize(w, bits, G, True), x)
    err_clip = _group_errors(w, fake_quantize(_clamped(w, res.min_val, res.max_val), bits, G, True), x)
    assert (err_clip <= err_none * (1 + 1e-4) + 1e-9).all()
    assert res.err_before == pytest.approx(err_none.mean().item(), rel=1e-4)
    assert res.err_after == pytest.approx(err_clip.mean().item(), rel=1e-4)


@pytest.mark.parametrize("outliers", [False, True])
def test_bounds_lie_within_the_original_range(outliers):
    w, x = _problem(2, outliers)
    res = search_clip(w, x, bits=4, group_size=G, zero_point=True)
    wg = w.reshape(OUT, -1, G)
    org_min, org_max = wg.amin(-1), wg.amax(-1)
    assert (org_min < 0).all() and (org_max > 0).all()  # zero-mean groups: shrinking is toward 0
    assert (res.min_val >= org_min).all() and (res.max_val <= org_max).all()
    assert (res.min_val <= res.max_val).all()
    # the shrink is the same factor at both ends, from the grid 1, 0.95, ..., 0.5
    ratio_lo, ratio_hi = res.min_val / org_min, res.max_val / org_max
    torch.testing.assert_close(ratio_lo, ratio_hi, rtol=1e-6, atol=0)
    assert (ratio_hi >= 0.5 - 1e-6).all() and (ratio_hi <= 1.0).all()
    grid = torch.tensor([1 - i / 20 for i in range(11)])
    assert ((ratio_hi.unsqueeze(-1) - grid).abs().amin(-1) < 1e-5).all()
    assert res.mean_ratio == pytest.approx(ratio_hi.mean().item(), rel=1e-5)


def test_clamped_weights_stay_in_range_even_for_one_signed_groups():
    """All-positive groups: the lower bound min·r lies below min (a no-op clamp); values never leave range."""
    w, x = _problem(3)
    w = w.abs() + 0.1
    res = search_clip(w, x, bits=4, group_size=G, zero_point=True)
    wc = _clamped(w, res.min_val, res.max_val).reshape(OUT, -1, G)
    wg = w.reshape(OUT, -1, G)
    assert (wc.amin(-1) >= wg.amin(-1)).all() and (wc.amax(-1) <= wg.amax(-1)).all()
    assert (res.max_val <= wg.amax(-1)).all()


def test_no_shrink_means_no_clipping():
    w, x = _problem(4, outliers=True)
    res = search_clip(w, x, bits=4, group_size=G, zero_point=True, max_shrink=0.0)
    wg = w.reshape(OUT, -1, G)
    assert res.mean_ratio == 1.0
    assert torch.equal(res.min_val, wg.amin(-1)) and torch.equal(res.max_val, wg.amax(-1))
    assert res.err_after == res.err_before


def test_clipping_reduces_error_with_outliers():
    w, x = _problem(5, outliers=True)
    res = search_clip(w, x, bits=4, group_size=G, zero_point=True)
    assert res.err_after < 0.7 * res.err_before  # observed ~0.4
    assert res.mean_ratio < 0.9
    # and the effect is real on the layer output, not only on the search's own bookkeeping
    y = x @ w.T
    y_rtn = x @ fake_quantize(w, 4, G, True).T
    y_clip = x @ fake_quantize(_clamped(w, res.min_val, res.max_val), 4, G, True).T
    assert (y_clip - y).pow(2).mean() < (y_rtn - y).pow(2).mean()


def test_per_row_group_size_and_shape_errors():
    w, x = _problem(6)
    res = search_clip(w, x, bits=4, group_size=-1, zero_point=True)
    assert res.min_val.shape == (OUT, 1)
    assert res.err_after <= res.err_before
    with pytest.raises(ValueError):
        search_clip(w, x[:, :64], bits=4, group_size=G, zero_point=True)
    with pytest.raises(ValueError):
        search_clip(w[0], x, bits=4, group_size=G, zero_point=True)
    with pytest.raises(ValueError):
        search_clip(w[:, :96], x[:, :96], bits=4, group_size=64, zero_point=True)


def test_sample_tokens_strides_evenly():
    x = torch.arange(2 * 50 * 3, dtype=torch.float64).reshape(2, 50, 3)
    s = sample_tokens(x, 10)
    assert s.shape == (10, 3) and s.dtype == torch.float32
    assert torch.equal(s[:, 0], torch.arange(0, 100, 10, dtype=torch.float32) * 3)
    assert sample_tokens(x, 1000).shape == (100, 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_independent_ends_never_worse_than_joint_and_help_one_sided_outliers(seed):
    """One large *positive* weight per group: shrinking only the max end beats shrinking both ends."""
    w, x = _problem(seed)
    cols = [k * G + 5 for k in range(IN // G)]
    w[:, cols] = 12.0
    x[:, cols] *= 0.05
    joint = search_clip(w, x, bits=4, group_size=G, zero_point=True)
    indep = search_clip(w, x, bits=4, group_size=G, zero_point=True, independent=True)
    err_joint = _group_errors(w, fake_quantize(_clamped(w, joint.min_val, joint.max_val), 4, G), x)
    err_indep = _group_errors(w, fake_quantize(_clamped(w, indep.min_val, indep.max_val), 4, G), x)
    assert (err_indep <= err_joint * (1 + 1e-4) + 1e-9).all()  # coordinate passes start from the joint optimum
    assert err_indep.mean() < 0.9 * err_joint.mean()
    assert indep.err_after == pytest.approx(err_indep.mean().item(), rel=1e-3)
    # the min end moved less than the max end on these groups: the range is no longer a scaled copy
    wg = w.reshape(OUT, -1, G)
    lo_ratio = (indep.min_val / wg.amin(-1)).mean()
    hi_ratio = (indep.max_val / wg.amax(-1)).mean()
    assert lo_ratio > hi_ratio + 0.1


@pytest.mark.parametrize("group", [G, -1])
def test_gram_input_gives_the_same_search_as_tokens(group):
    """search_clip(w, x) == search_clip(w, gram=group_gram(x), n_tokens=len(x)); blocks accumulate over batches."""
    from awqkit.calib.stats import group_gram

    w, x = _problem(3, outliers=True)
    a = search_clip(w, x, bits=4, group_size=group, zero_point=True)
    gram = group_gram(x[:120], group) + group_gram(x[120:], group)  # summed over two "batches"
    b = search_clip(w, gram=gram, n_tokens=x.shape[0], bits=4, group_size=group, zero_point=True)
    assert torch.equal(a.min_val, b.min_val) and torch.equal(a.max_val, b.max_val)
    assert a.err_after == pytest.approx(b.err_after, rel=1e-5)
    g = IN if group == -1 else G
    assert gram.shape == (IN // g, g, g) and gram.dtype == torch.float64
    torch.testing.assert_close(gram[0], (x[:, :g].double().T @ x[:, :g].double()), rtol=1e-5, atol=1e-3)  # fp32 sums
    with pytest.raises(ValueError, match="not both"):
        search_clip(w, x, gram=gram, n_tokens=200, bits=4, group_size=group, zero_point=True)
    with pytest.raises(ValueError, match="do not fit"):
        search_clip(w, gram=gram[:, :2], n_tokens=200, bits=4, group_size=group, zero_point=True)
