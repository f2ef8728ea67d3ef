"""The learned grid of block refinement (algo/refine.py): AWQ's round to nearest at the start, integers that
dequantize to exactly what the forward pass used, at most one step from round to nearest on an unchanged range,
signed descent that lowers a reconstruction error, determinism and argument checks; the learned norm weights
(norm tweaking) start at the norm's weight, stay in their range and undo a per-channel input error."""

from __future__ import annotations

import pytest
import torch
from conftest import clipped_linear_case

from awqkit.algo.refine import MAX_RANGE, MIN_RANGE, LearnedGrid, LearnedNorm, signed_descent
from awqkit.quant.primitives import dequantize, fake_quantize, quantize_weight

G, BITS = 32, 3


@pytest.mark.parametrize("zero_point", [True, False])
def test_the_grid_starts_at_round_to_nearest_of_the_clipped_weight(zero_point: bool) -> None:
    w, _, clipped = clipped_linear_case()
    grid = LearnedGrid(clipped, clipped, BITS, G, zero_point)
    assert torch.equal(grid.weight().detach(), fake_quantize(clipped, BITS, G, zero_point))
    q, s, z = grid.integers()
    q_rtn, s_rtn, z_rtn = quantize_weight(clipped, BITS, G, zero_point)
    assert torch.equal(q.to(torch.int32), q_rtn) and torch.equal(s, s_rtn) and torch.equal(z, z_rtn)
    # on the unclipped weight the start is the clipped weight's grid, with the weights beyond it at its ends
    start = LearnedGrid(w, clipped, BITS, G, zero_point).integers()
    assert torch.equal(start[1], s_rtn) and torch.equal(start[2], z_rtn)
    assert (start[0].to(torch.int32) - q_rtn).abs().max() <= 1


@pytest.mark.parametrize("zero_point", [True, False])
def test_integers_dequantize_to_the_forward_weight_and_stay_one_step_from_rtn(zero_point: bool) -> None:
    w, _, clipped = clipped_linear_case()
    grid = LearnedGrid(w, clipped, BITS, G, zero_point)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        grid.v.copy_(torch.rand(grid.v.shape, generator=gen) - 0.5)
    q, s, z = grid.integers()
    assert q.dtype == torch.uint8 and int(q.max()) <= 2**BITS - 1
    assert torch.equal(dequantize(q.to(torch.int32), s, z, G), grid.weight().detach())
    q_rtn = LearnedGrid(w, clipped, BITS, G, zero_point).integers()[0]
    moved = (q.to(torch.int32) - q_rtn.to(torch.int32)).abs()
    assert moved.max() == 1 and moved.sum() > 0  # v moved some integers, none by more than one step
    with torch.no_grad():  # a changed range changes the scales, and the export follows it exactly
        grid.hi.fill_(0.8)
        grid.lo.fill_(1.2)
    q, s, z = grid.integers()
    assert torch.equal(dequantize(q.to(torch.int32), s, z, G), grid.weight().detach())
    assert torch.equal(s, s.half().float())  # fp16-representable, as the checkpoint stores them


def _fit(seed: int, iters: int) -> tuple[LearnedGrid, list[float], float]:
    w, h, clipped = clipped_linear_case()
    x = torch.linalg.cholesky(h + 1e-3 * torch.eye(h.shape[0])).T  # x with xᵀx = h: the inputs, up to rotation
    grid = LearnedGrid(w, clipped, BITS, G, True)
    target = x @ w.T

    def loss(j: int) -> torch.Tensor:
        rows = x[j * 32 : (j + 1) * 32]
        return (rows @ grid.weight().T - target[j * 32 : (j + 1) * 32]).pow(2).mean()

    start = float((x @ grid.weight().detach().T - target).pow(2).mean())
    history = signed_descent([grid], loss, iters, 1.0 / iters, 4, seed=seed)
    return grid, history, start


def test_signed_descent_lowers_the_reconstruction_error_and_keeps_ranges() -> None:
    grid, history, start = _fit(0, 200)
    w, h, _ = clipped_linear_case()
    x = torch.linalg.cholesky(h + 1e-3 * torch.eye(h.shape[0])).T
    end = float((x @ grid.weight().detach().T - x @ w.T).pow(2).mean())
    assert end < 0.8 * start, (start, end)
    assert len(history) == 200
    assert grid.v.abs().max() <= 0.5
    assert MIN_RANGE <= float(grid.lo.detach().min()) and float(grid.hi.detach().max()) <= MAX_RANGE
    assert not torch.equal(grid.hi, torch.ones_like(grid.hi))  # the range was learned too


def test_signed_descent_is_deterministic_for_a_seed() -> None:
    a, ha, _ = _fit(5, 30)
    b, hb, _ = _fit(5, 30)
    c, hc, _ = _fit(6, 30)
    assert ha == hb and torch.equal(a.integers()[0], b.integers()[0])
    assert ha != hc  # another seed visits the batches in another order


def test_bad_arguments_are_refused() -> None:
    w, _, clipped = clipped_linear_case()
    with pytest.raises(ValueError, match="differ in shape"):
        LearnedGrid(w, clipped[:, :64], BITS, G, True)
    grid = LearnedGrid(w, clipped, BITS, G, True)
    with pytest.raises(ValueError, match="lr="):
        signed_descent([grid], lambda j: grid.weight().sum(), 10, 0.0, 1)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_a_learned_norm_starts_at_its_weight_and_keeps_its_range(offset: float) -> None:
    w = torch.randn(16, generator=torch.Generator().manual_seed(0)) * 0.3 + (0.0 if offset else 1.0)
    norm = LearnedNorm(w, 0.2, offset)
    assert torch.equal(norm.weight().detach(), (w + offset) * 1.0 - offset)
    with torch.no_grad():
        norm.u.fill_(7.0)
    norm.clamp_()
    assert torch.allclose(norm.weight().detach() + offset, (w + offset) * 1.2)  # the scale moved by +r at most
    with pytest.raises(ValueError, match="max_change"):
        LearnedNorm(w, 1.0)
    with pytest.raises(ValueError, match="one-dimensional"):
        LearnedNorm(w.reshape(4, 4), 0.2)


def test_signed_descent_on_a_norm_undoes_a_per_channel_input_scale() -> None:
    """A linear whose input channels were scaled by up to +-10 %: the norm's learned scale undoes it (the
    objective drops well below its start), within its range."""
    gen = torch.Generator().manual_seed(3)
    x, lin = torch.randn(4, 64, 16, generator=gen), torch.randn(8, 16, generator=gen)
    skew = 1.0 + 0.1 * (2 * torch.rand(16, generator=gen) - 1)
    target = (x * skew) @ lin.T
    norm = LearnedNorm(torch.ones(16), 0.2)

    def loss(j: int) -> torch.Tensor:
        return ((x[j] * norm.weight()) @ lin.T - target[j]).pow(2).mean()

    start = float(sum(loss(j).detach() for j in range(4)))
    signed_descent([norm], loss, 100, 0.02, 4)
    end = float(sum(loss(j).detach() for j in range(4)))
    assert end < 0.05 * start, (start, end)
    assert float(norm.u.detach().abs().max()) <= 1.0
