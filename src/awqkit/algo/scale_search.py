"""AWQ scale search for one mapping (Lin et al., MLSys 2024, Eq. 4-5; duo variant from AutoAWQ).

Objective, for the linears ``W_i`` sharing input ``X`` and the module ``M`` that consumes them::

    L(s) = || M[Q(W_i · diag(s)) · diag(s)⁻¹](X) − M[W_i](X) ||²  / numel      (fp32 MSE)

Grid (``n_grid`` points α_j = j / (n_grid − 1), j = 0..n_grid−1, so α = 0 and α = 1 are included):

* ``x``:   s = x̄^α                     (α = 0 is the identity, i.e. plain RTN)
* ``duo``: s = x̄^α / (w̄^(1−α) + 1e-4)
* ``both``: the union of the two grids.

x̄ is the per-input-channel mean |x| over all calibration tokens; w̄ the per-input-channel mean of
|w| / max|w| within each quantization group, over the rows of all the linears. Every candidate is
clamped to ≥ 1e-4 and normalised by sqrt(max · min). The identity is always scored, so the chosen
scales never score worse than RTN on the search data. Non-finite candidates are skipped; if nothing
finite remains the identity is returned with ``fallback=True``.

Tied heads (grouped-query v → o, ``heads=(head_dim, n_rep)``): x̄ and w̄ are averaged over the ``n_rep``
copies of each kv channel, candidates live in v's channel space, and the linears see them repeated per
head (:func:`awqkit.algo.fold.expand_heads`), which is what folding into v's rows produces.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from awqkit.algo.fold import expand_heads, reduce_heads
from awqkit.quant.primitives import fake_quantize, resolve_group_size

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScaleCandidate:
    mode: str  # "x" or "duo"
    alpha: float
    scales: Tensor  # [in], float32


@dataclass
class ScaleSearchResult:
    scales: Tensor  # [in] float32, the chosen s (ones when the identity wins)
    mode: str
    alpha: float
    loss_identity: float  # RTN (s = 1) loss
    loss_best: float
    n_candidates: int
    fallback: bool = False  # True when no candidate gave a finite loss


def weight_mean(weights: Sequence[Tensor], group_size: int) -> Tensor:
    """w̄ ``[in]``: mean over rows of |w| / max|w| within each group, for ``weights`` each ``[out_i, in]``."""
    w = torch.cat([x.detach().float() for x in weights], dim=0)
    g = resolve_group_size(w.shape[1], group_size)
    wg = w.abs().reshape(-1, g)
    wg = wg / (wg.amax(dim=1, keepdim=True) + 1e-6)
    return wg.reshape(w.shape).mean(dim=0)


def _normalise(s: Tensor) -> Tensor:
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def candidate_scales(x_mean: Tensor, w_mean: Tensor | None, n_grid: int, mode: str) -> list[ScaleCandidate]:
    """The grid of candidate scales described in the module docstring (identity first)."""
    if mode not in ("x", "duo", "both"):
        raise ValueError(f"scale mode {mode!r}: choose x, duo or both")
    x = x_mean.detach().float().clamp(min=1e-8)
    alphas = [j / (n_grid - 1) for j in range(n_grid)]
    out: list[ScaleCandidate] = []
    if mode in ("x", "both"):
        out += [ScaleCandidate("x", a, _normalise(x.pow(a))) for a in alphas]
    if mode in ("duo", "both"):
        if w_mean is None:
            raise ValueError("duo scaling needs w_mean")
        w = w_mean.detach().float().clamp(min=1e-8)
        out += [ScaleCandidate("duo", a, _normalise(x.pow(a) / (w.pow(1 - a) + 1e-4))) for a in alphas]
    if mode == "duo":  # the identity is always a candidate
        out.insert(0, ScaleCandidate("x", 0.0, torch.ones_like(x)))
    return out


class ModuleScorer:
    """Loss of a module's output against its output with the original weights, on cached batches.

    ``forward(b)`` runs the scoring module on cached batch ``b`` with the current weights.
    """

    def __init__(self, forward: Callable[[int], Tensor], n_batches: int) -> None:
        self.forward = forward
        self.n_batches = n_batches
        self.reference = [forward(b).float() for b in range(n_batches)]
        self.numel = sum(r.numel() for r in self.reference)

    def __call__(self) -> float:
        total = 0.0
        for b in range(self.n_batches):
            total += (self.forward(b).float() - self.reference[b]).double().pow(2).sum().item()
        return total / self.numel


class GramScorer:
    """Exact output MSE of one linear from its input Gram matrix ``G = Σ_t x_t x_tᵀ`` ``[in, in]``.

    ``mean_t,o ((W' − W) x_t)_o² = tr(ΔW G ΔWᵀ) / (n_tokens · out)`` — every calibration token counts,
    at a cost independent of the token count.
    """

    def __init__(self, linear: nn.Linear, gram: Tensor, n_tokens: int) -> None:
        self.linear = linear
        self.gram = gram.float()
        self.original = linear.weight.detach().float().clone()
        self.denominator = float(n_tokens) * linear.out_features

    def __call__(self) -> float:
        dw = self.linear.weight.float() - self.original
        return ((dw @ self.gram) * dw).double().sum().item() / self.denominator


@torch.no_grad()
def search_scales(
    linears: Sequence[nn.Linear],
    score: Callable[[], float],
    x_mean: Tensor,
    *,
    bits: int,
    group_size: int,
    zero_point: bool,
    n_grid: int,
    mode: str,
    quantize_mask: Sequence[bool] | None = None,
    heads: tuple[int, int] | None = None,
) -> ScaleSearchResult:
    """Grid-search s for ``linears`` (see module docstring).

    Args:
        linears: the balanced linears, all ``[out_i, in]``; their weights are restored on return.
        score: loss of the scoring module with the linears' *current* weights against the original
            weights' output (:class:`ModuleScorer` or :class:`GramScorer`); built before the search.
        x_mean: ``[in]`` mean |x| of the linears' input over all calibration tokens.
        quantize_mask: which linears are quantized (False for those kept in float); default all.
        heads: ``(head_dim, n_rep)`` to search scales tied per kv head; the result is then in the
            kv channel space (``in / n_rep`` entries).
    """
    mask = list(quantize_mask) if quantize_mask is not None else [True] * len(linears)
    originals = [lin.weight.detach().clone() for lin in linears]  # explicit copies: .cpu() would alias
    q_linears = [lin for lin, m in zip(linears, mask) if m]
    w_mean = weight_mean([lin.weight for lin in q_linears], group_size) if q_linears and mode != "x" else None
    if heads is not None:
        x_mean = reduce_heads(x_mean.float(), *heads)
        w_mean = reduce_heads(w_mean, *heads) if w_mean is not None else None
    candidates = candidate_scales(x_mean, w_mean, n_grid, mode)

    losses: list[float] = []
    for cand in candidates:
        s = cand.scales.to(originals[0].device)
        if heads is not None:
            s = expand_heads(s, *heads)
        for lin, orig, quant in zip(linears, originals, mask):
            if quant:
                scaled = orig.float() * s.unsqueeze(0)
                lin.weight.copy_((fake_quantize(scaled, bits, group_size, zero_point) / s.unsqueeze(0)).to(orig.dtype))
        losses.append(score())
    for lin, orig in zip(linears, originals):
        lin.weight.copy_(orig)

    loss_identity = losses[0]
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    if not finite:
        logger.warning("scale search: no candidate gave a finite loss; using identity scales")
        return ScaleSearchResult(torch.ones_like(x_mean.float()), "x", 0.0, loss_identity, loss_identity,
                                 len(candidates), fallback=True)
    best = min(finite, key=lambda i: (losses[i], i))
    cand = candidates[best]
    return ScaleSearchResult(cand.scales.detach().cpu().clone(), cand.mode, cand.alpha, loss_identity,
                             losses[best], len(candidates))
