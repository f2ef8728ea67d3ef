"""AWQ scale search: the candidate grid, the win over RTN on salient channels, scorers, fallbacks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from awqkit.algo.scale_search import (
    GramScorer,
    ModuleScorer,
    TokenScorer,
    candidate_scales,
    search_scales,
    weight_mean,
)
from awqkit.quant.primitives import fake_quantize

IN, OUT, GROUP = 256, 128, 64


def _x_mean(n: int = IN, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 5 + 0.01


# ----------------------------------------------------------------------------- candidate grid


@pytest.mark.parametrize("n_grid", [2, 5, 20])
def test_x_grid_has_n_grid_alphas_with_both_ends_identity_first(n_grid):
    x = _x_mean()
    cands = candidate_scales(x, None, n_grid, "x")
    assert len(cands) == n_grid
    alphas = [c.alpha for c in cands]
    assert alphas == [j / (n_grid - 1) for j in range(n_grid)]
    assert alphas[0] == 0.0 and alphas[-1] == 1.0
    assert cands[0].mode == "x"
    assert torch.equal(cands[0].scales, torch.ones(IN))  # exactly ones, not merely close
    # alpha = 1: proportional to x_mean
    last = cands[-1].scales
    ratio = last / x
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()), rtol=1e-5, atol=0)


@pytest.mark.parametrize("mode", ["x", "duo", "both"])
def test_every_candidate_is_normalised_positive_finite_float32(mode):
    x = _x_mean()
    x[3] = 0.0  # a dead channel: clamped, never zero or inf
    w = weight_mean([torch.randn(OUT, IN, generator=torch.Generator().manual_seed(1))], GROUP)
    for c in candidate_scales(x, w, 7, mode):
        s = c.scales
        assert s.shape == (IN,) and s.dtype == torch.float32
        assert torch.isfinite(s).all() and (s > 0).all()
        assert math.isclose(math.sqrt(s.max().item() * s.min().item()), 1.0, rel_tol=1e-5)


def test_duo_and_both_counts_and_identity_first():
    x = _x_mean()
    w = weight_mean([torch.randn(OUT, IN, generator=torch.Generator().manual_seed(1))], GROUP)
    duo = candidate_scales(x, w, 5, "duo")
    both = candidate_scales(x, w, 5, "both")
    assert len(duo) == 5 + 1  # the identity is prepended
    assert len(both) == 2 * 5
    for cands in (duo, both):
        assert (cands[0].mode, cands[0].alpha) == ("x", 0.0)
        assert torch.equal(cands[0].scales, torch.ones(IN))
    assert [c.mode for c in duo[1:]] == ["duo"] * 5
    assert [c.alpha for c in duo[1:]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [c.mode for c in both] == ["x"] * 5 + ["duo"] * 5
    # duo at alpha 0 is 1 / w_mean (normalised), at alpha 1 it is x_mean / (1 + 1e-4) (normalised)
    expect0 = 1 / (w.clamp(min=1e-8) + 1e-4)
    expect0 = expect0 / (expect0.max() * expect0.min()).sqrt()
    torch.testing.assert_close(duo[1].scales, expect0, rtol=1e-5, atol=0)
    torch.testing.assert_close(duo[-1].scales, both[4].scales, rtol=1e-5, atol=0)


def test_candidate_scales_rejects_bad_mode_and_duo_without_w_mean():
    with pytest.raises(ValueError, match="mode"):
        candidate_scales(_x_mean(), None, 5, "y")
    with pytest.raises(ValueError, match="w_mean"):
        candidate_scales(_x_mean(), None, 5, "duo")


def test_weight_mean_is_relative_to_each_group_max():
    w = torch.ones(4, IN)
    w[:, 0] = 4.0  # group 0's max is 4: its other entries become 1/4
    wm = weight_mean([w], GROUP)
    assert wm.shape == (IN,)
    torch.testing.assert_close(wm[0], torch.tensor(4 / (4 + 1e-6)))
    torch.testing.assert_close(wm[1:GROUP], torch.full((GROUP - 1,), 1 / (4 + 1e-6)))
    torch.testing.assert_close(wm[GROUP:], torch.full((IN - GROUP,), 1 / (1 + 1e-6)))


# ----------------------------------------------------------------------------- AWQ beats RTN


def _salient_problem(seed: int):
    """A Linear(256 -> 128) whose input has 4 channels 20-50x larger than the rest."""
    torch.manual_seed(seed)
    lin = nn.Linear(IN, OUT, bias=True)
    x = torch.randn(512, IN)
    idx = torch.randperm(IN)[:4]
    x[:, idx] *= torch.tensor([20.0, 30.0, 40.0, 50.0])
    return lin, x


def _output_mse(w: torch.Tensor, x: torch.Tensor, s: torch.Tensor, bits: int) -> float:
    """Output MSE of fake-quantizing W·diag(s) and dividing by s, computed here from scratch."""
    wq = fake_quantize(w * s.unsqueeze(0), bits, GROUP, True) / s.unsqueeze(0)
    return ((x @ wq.T - x @ w.T) ** 2).mean().item()


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("mode", ["x", "duo", "both"])
@pytest.mark.parametrize("seed", [0, 1])
def test_awq_search_beats_rtn_on_salient_channels(mode, bits, seed):
    lin, x = _salient_problem(seed)
    w0 = lin.weight.detach().clone()
    b0 = lin.bias.detach().clone()
    batches = x.reshape(4, 128, IN)
    scorer = ModuleScorer(lambda b: lin(batches[b]), 4)
    res = search_scales(
        [lin], scorer, x.abs().mean(0), bits=bits, group_size=GROUP, zero_point=True, n_grid=10, mode=mode
    )
    # weights restored exactly (bit for bit) after trying every candidate
    assert torch.equal(lin.weight, w0) and torch.equal(lin.bias, b0)

    mse_rtn = _output_mse(w0, x, torch.ones(IN), bits)
    mse_awq = _output_mse(w0, x, res.scales, bits)
    assert mse_awq < 0.75 * mse_rtn  # observed ~0.3-0.45: the salient channels are protected
    assert not res.fallback
    assert res.alpha > 0 and not torch.equal(res.scales, torch.ones(IN))
    assert res.n_candidates == {"x": 10, "duo": 11, "both": 20}[mode]
    # the reported losses are the same quantities (the scorer measures what the docstring says)
    assert math.isclose(res.loss_identity, mse_rtn, rel_tol=1e-4)
    assert math.isclose(res.loss_best, mse_awq, rel_tol=1e-4)


def test_both_mode_picks_the_better_of_x_and_duo():
    lin, x = _salient_problem(0)
    batches = x.reshape(4, 128, IN)
    best = {}
    for mode in ("x", "duo", "both"):
        scorer = ModuleScorer(lambda b: lin(batches[b]), 4)
        best[mode] = search_scales(
            [lin], scorer, x.abs().mean(0), bits=4, group_size=GROUP, zero_point=True, n_grid=10, mode=mode
        ).loss_best
    assert best["both"] == min(best["x"], best["duo"])


def test_search_over_several_linears_respects_quantize_mask():
    """Linears kept in float (mask False) are never fake-quantized while scoring."""
    lin, x = _salient_problem(2)
    torch.manual_seed(3)
    other = nn.Linear(IN, 64, bias=False)
    w_other = other.weight.detach().clone()
    seen_other = []

    def forward(b: int) -> torch.Tensor:
        seen_other.append(torch.equal(other.weight, w_other))
        return torch.cat([lin(x[b * 256 : (b + 1) * 256]), other(x[b * 256 : (b + 1) * 256])], dim=-1)

    scorer = ModuleScorer(forward, 2)
    res = search_scales(
        [lin, other],
        scorer,
        x.abs().mean(0),
        bits=4,
        group_size=GROUP,
        zero_point=True,
        n_grid=5,
        mode="both",
        quantize_mask=[True, False],
    )
    assert all(seen_other)
    assert torch.equal(other.weight, w_other)
    assert res.loss_best < res.loss_identity


# ----------------------------------------------------------------------------- scorers


def test_gram_and_token_scorers_equal_module_scorer():
    lin, x = _salient_problem(4)
    batches = x.reshape(4, 128, IN)
    module = ModuleScorer(lambda b: lin(batches[b]), 4)
    gram = GramScorer(lin, (x.double().T @ x.double()), x.shape[0])
    tokens = TokenScorer(lin, x)
    assert module() == 0.0 and gram() == 0.0 and tokens() == 0.0  # original weights: zero loss for all
    w0 = lin.weight.detach().clone()
    s = x.abs().mean(0).pow(0.5)
    s = s / (s.max() * s.min()).sqrt()
    for cand in (torch.ones(IN), s):
        with torch.no_grad():
            lin.weight.copy_(fake_quantize(w0 * cand, 4, GROUP, True) / cand)
        a, b, c = module(), gram(), tokens()
        assert a > 0
        assert math.isclose(a, b, rel_tol=1e-4), (a, b)
        assert math.isclose(a, c, rel_tol=1e-5), (a, c)


def test_module_scorer_reference_is_taken_at_construction():
    lin, x = _salient_problem(5)
    scorer = ModuleScorer(lambda b: lin(x), 1)
    with torch.no_grad():
        lin.weight.add_(1.0)
    assert scorer() > 0.5  # the reference did not follow the weights


# ----------------------------------------------------------------------------- non-finite losses


def test_nan_forward_falls_back_to_identity():
    lin, x = _salient_problem(6)
    w0 = lin.weight.detach().clone()
    scorer = ModuleScorer(lambda b: lin(x) * float("nan"), 1)
    res = search_scales(
        [lin], scorer, x.abs().mean(0), bits=4, group_size=GROUP, zero_point=True, n_grid=5, mode="both"
    )
    assert res.fallback is True
    assert torch.equal(res.scales, torch.ones(IN))
    assert (res.mode, res.alpha) == ("x", 0.0)
    assert math.isnan(res.loss_identity) and math.isnan(res.loss_best)
    assert res.n_candidates == 10
    assert torch.equal(lin.weight, w0)


def test_non_finite_candidates_are_skipped():
    lin, x = _salient_problem(7)
    losses = iter([5.0, float("nan"), float("inf"), 1.0, float("nan")])
    res = search_scales(
        [lin], lambda: next(losses), x.abs().mean(0), bits=4, group_size=GROUP, zero_point=True, n_grid=5, mode="x"
    )
    assert not res.fallback
    assert res.alpha == 0.75 and res.loss_best == 1.0 and res.loss_identity == 5.0


def test_ties_keep_the_earliest_candidate_identity():
    lin, x = _salient_problem(8)
    res = search_scales(
        [lin], lambda: 1.0, x.abs().mean(0), bits=4, group_size=GROUP, zero_point=True, n_grid=5, mode="both"
    )
    assert torch.equal(res.scales, torch.ones(IN)) and res.alpha == 0.0 and not res.fallback


def test_tied_heads_search_returns_kv_space_scales_that_are_repeated_per_head():
    """heads=(head_dim, n_rep): the result has in / n_rep entries, and the loss reported is that of the
    scales repeated per head (what folding into v's rows gives o's columns)."""
    from awqkit.algo.fold import expand_heads

    head_dim, n_rep = 32, 2  # IN = 256 = 4 kv heads x 2 repeats x 32
    lin, x = _salient_problem(3)
    # make the salient channels the same in both copies of each kv head, as repeat_kv does
    kv = x.reshape(512, -1, n_rep, head_dim)[:, :, :1].expand(-1, -1, n_rep, -1).reshape(512, IN).clone()
    w0 = lin.weight.detach().clone()
    scorer = ModuleScorer(lambda b: lin(kv.reshape(4, 128, IN)[b]), 4)
    res = search_scales(
        [lin],
        scorer,
        kv.abs().mean(0),
        bits=4,
        group_size=GROUP,
        zero_point=True,
        n_grid=10,
        mode="x",
        heads=(head_dim, n_rep),
    )
    assert res.scales.shape == (IN // n_rep,)
    assert torch.equal(lin.weight, w0)
    assert res.alpha > 0
    mse = _output_mse(w0, kv, expand_heads(res.scales, head_dim, n_rep), 4)
    assert math.isclose(res.loss_best, mse, rel_tol=1e-4)
    assert mse < 0.75 * _output_mse(w0, kv, torch.ones(IN), 4)


# ----------------------------------------------------------------------------- ranked search


def test_ranked_search_scores_identity_and_top_k_by_rank() -> None:
    from awqkit.algo.scale_search import GroupGramProxy
    from awqkit.calib.stats import group_gram

    lin, x = _salient_problem(0)
    batches = x.reshape(4, 128, IN)
    calls = {"score": 0}

    def scorer_forward(b: int) -> torch.Tensor:
        return lin(batches[b])

    score = ModuleScorer(scorer_forward, 4)

    def counted() -> float:
        calls["score"] += 1
        return score()

    exhaustive = search_scales(
        [lin], score, x.abs().mean(0), bits=4, group_size=GROUP, zero_point=True, n_grid=10, mode="both"
    )
    assert all(v is not None for v in exhaustive.losses) and exhaustive.proxy_losses == []
    proxy = GroupGramProxy([lin], group_gram(x, GROUP), x.shape[0])
    ranked = search_scales(
        [lin],
        counted,
        x.abs().mean(0),
        bits=4,
        group_size=GROUP,
        zero_point=True,
        n_grid=10,
        mode="both",
        rank=proxy,
        top_k=2,
    )
    assert calls["score"] == 3  # the identity and the two best by rank
    scored = [i for i, v in enumerate(ranked.losses) if v is not None]
    by_rank = sorted(range(1, len(ranked.proxy_losses)), key=lambda i: (ranked.proxy_losses[i], i))[:2]
    assert scored == sorted([0, *by_rank])
    assert ranked.chosen in scored and ranked.loss_best == min(ranked.losses[i] for i in scored)
    # scored candidates get the same exact loss as in the exhaustive search
    assert all(ranked.losses[i] == exhaustive.losses[i] for i in scored)
    # a perfect ranking (the objective itself) with top_k=1 chooses what the exhaustive search chooses
    perfect = search_scales(
        [lin],
        score,
        x.abs().mean(0),
        bits=4,
        group_size=GROUP,
        zero_point=True,
        n_grid=10,
        mode="both",
        rank=score,
        top_k=1,
    )
    assert perfect.chosen == exhaustive.chosen and torch.equal(perfect.scales, exhaustive.scales)
    with pytest.raises(ValueError, match="top_k"):
        search_scales(
            [lin],
            score,
            x.abs().mean(0),
            bits=4,
            group_size=GROUP,
            zero_point=True,
            n_grid=10,
            mode="both",
            rank=score,
            top_k=-1,
        )


def test_group_gram_proxy_is_the_output_mse_without_cross_group_terms() -> None:
    from awqkit.algo.scale_search import GroupGramProxy
    from awqkit.calib.stats import group_gram

    lin, x = _salient_problem(1)
    w0 = lin.weight.detach().clone()
    full = GroupGramProxy([lin], group_gram(x, IN), x.shape[0])  # one block: the whole Gram
    blocks = GroupGramProxy([lin], group_gram(x, GROUP), x.shape[0])
    exact = GramScorer(lin, x.T.double() @ x.double(), x.shape[0])
    with torch.no_grad():
        lin.weight.copy_(fake_quantize(w0, 4, GROUP, True))
    d = (lin.weight - w0).double()
    dx = x.double() @ d.T
    mse = (dx**2).mean().item()
    assert full() == pytest.approx(mse, rel=1e-4) and exact() == pytest.approx(mse, rel=1e-4)
    xg, dg = x.double().reshape(-1, IN // GROUP, GROUP), d.reshape(OUT, IN // GROUP, GROUP)
    per_group = torch.einsum("tgk,ogk->tog", xg, dg)  # each group's share of the output error
    assert blocks() == pytest.approx((per_group**2).sum(-1).mean().item(), rel=1e-4)
