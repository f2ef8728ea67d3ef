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

Ranked search (``rank`` + ``top_k > 0``): scoring a module such as attention or the MLP costs a forward over
thousands of cached tokens per candidate. A cheaper ranking pass orders the whole grid first, then only the
identity and the ``top_k`` best candidates are scored on the full objective ``L(s)`` above and the best of
those is chosen (``top_k = 0`` scores every candidate: the exhaustive search). The ranking is any callable
evaluated like ``score``; the pipeline uses the same objective on a small subset of the search data
(``SearchConfig.rank_by="subset"``, default: measured on SmolLM2-135M, 512 tokens put the exhaustive winner
in the top 3 for every mapping tried), or :class:`GroupGramProxy`, the balanced linears' own output error
over every token from the per-group Gram blocks of their input (``"gram"``: cost independent of the token
count, but it ranks attention poorly because it ignores what q/k errors do through the softmax).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
    losses: list[float | None] = field(default_factory=list)  # exact loss per candidate (None: not scored)
    proxy_losses: list[float] = field(default_factory=list)  # ranking proxy per candidate (empty: no proxy)
    chosen: int = 0  # index of the chosen candidate in the grid


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

    ``forward(b)`` runs the scoring module on cached batch ``b`` with the current weights. ``reduce`` sums a
    list of floats over data-parallel ranks (:meth:`awqkit.parallel.DataParallel.sum_floats`) when each rank
    holds a share of the batches: the squared errors and element counts are then totals over all ranks.
    """

    def __init__(
        self,
        forward: Callable[[int], Tensor],
        n_batches: int,
        reduce: Callable[[list[float]], list[float]] | None = None,
    ) -> None:
        self.forward = forward
        self.n_batches = n_batches
        self.reduce = reduce
        self.reference = [forward(b).float() for b in range(n_batches)]
        numel = sum(r.numel() for r in self.reference)
        self.numel = int(reduce([float(numel)])[0]) if reduce is not None else numel

    def __call__(self) -> float:
        total = 0.0
        for b in range(self.n_batches):
            total += (self.forward(b).float() - self.reference[b]).double().pow(2).sum().item()
        if self.reduce is not None:
            total = self.reduce([total])[0]
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


class TokenScorer:
    """The same output MSE as :class:`GramScorer`, from the input tokens ``x`` ``[n, in]`` themselves:
    ``mean_t,o ((W' − W) x_t)_o² = ||x ΔWᵀ||² / (n · out)``. Costs ``n · in · out`` per candidate against the
    Gram form's ``in² · out``: the cheaper one when there are fewer calibration tokens than input channels
    (a Llama-3-8B down_proj, in = 14336, with a few hundred tokens: 29x fewer FLOPs and no 1.6 GB Gram)."""

    def __init__(self, linear: nn.Linear, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != linear.in_features or x.shape[0] < 1:
            raise ValueError(f"TokenScorer: x {tuple(x.shape)} must be [n >= 1, {linear.in_features}]")
        self.linear = linear
        self.x = x.float()
        self.original = linear.weight.detach().float().clone()
        self.denominator = float(x.shape[0]) * linear.out_features

    def __call__(self) -> float:
        dw = self.linear.weight.float() - self.original
        return (self.x @ dw.T).double().pow(2).sum().item() / self.denominator


class GroupGramProxy:
    """``Σ_i Σ_G Δ_{i,G}ᵀ C_G Δ_{i,G} / (n_tokens · Σ out_i)`` over the balanced linears' weight changes
    ``Δ_i = W'_i − W_i`` from their weights at construction: their output MSE with every calibration token
    counted, minus the cross-group terms of the input's Gram (a ranking proxy, see the module docstring).

    ``blocks``: ``[in/g, g, g]`` diagonal Gram blocks of the shared input (:func:`awqkit.algo.clip_search.
    group_gram`, summed over ``n_tokens`` tokens); ``g = in`` gives the full Gram.
    """

    def __init__(self, linears: Sequence[nn.Linear], blocks: Tensor, n_tokens: int) -> None:
        if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2] or n_tokens < 1:
            raise ValueError(
                f"GroupGramProxy: blocks {tuple(blocks.shape)} must be [in/g, g, g] and n_tokens ({n_tokens}) >= 1"
            )
        self.linears = list(linears)
        self.originals = [lin.weight.detach().float().clone() for lin in self.linears]
        self.blocks = blocks.float()
        self.denominator = float(n_tokens) * sum(lin.out_features for lin in self.linears)

    def __call__(self) -> float:
        n_groups, g, _ = self.blocks.shape
        total = 0.0
        for lin, orig in zip(self.linears, self.originals, strict=True):
            d = lin.weight.float() - orig
            dg = d.reshape(d.shape[0], n_groups, g).transpose(0, 1)  # [G, out, g]
            total += (torch.bmm(dg, self.blocks) * dg).double().sum().item()
        return total / self.denominator


def _set_candidate(
    linears: Sequence[nn.Linear],
    originals: Sequence[Tensor],
    mask: Sequence[bool],
    s: Tensor,
    bits: Sequence[int],
    group_size: int,
    zero_point: bool,
) -> None:
    """Every quantized linear's weight := Q(W · diag(s)) · diag(s)⁻¹ at its own width (the others keep theirs)."""
    for lin, orig, quant, b in zip(linears, originals, mask, bits, strict=True):
        if quant:
            scaled = orig.float() * s.unsqueeze(0)  # a fresh float32 buffer, quantized in place
            lin.weight.copy_(fake_quantize(scaled, b, group_size, zero_point, inplace=True).div_(s.unsqueeze(0)))


@torch.no_grad()
def search_scales(
    linears: Sequence[nn.Linear],
    score: Callable[[], float],
    x_mean: Tensor,
    *,
    bits: int | Sequence[int],
    group_size: int,
    zero_point: bool,
    n_grid: int,
    mode: str,
    quantize_mask: Sequence[bool] | None = None,
    heads: tuple[int, int] | None = None,
    rank: Callable[[], float] | None = None,
    top_k: int = 0,
) -> ScaleSearchResult:
    """Grid-search s for ``linears`` (see module docstring).

    Args:
        linears: the balanced linears, all ``[out_i, in]``; their weights are restored on return.
        score: loss of the scoring module with the linears' *current* weights against the original
            weights' output (:class:`ModuleScorer` or :class:`GramScorer`); built before the search.
        x_mean: ``[in]`` mean |x| of the linears' input over all calibration tokens.
        bits: the width of every linear, or of each (mixed bits: each candidate quantizes each linear at its own
            width, so the objective scores the mix that will be stored).
        quantize_mask: which linears are quantized (False for those kept in float); default all.
        heads: ``(head_dim, n_rep)`` to search scales tied per kv head; the result is then in the
            kv channel space (``in / n_rep`` entries).
        rank: a cheaper loss evaluated like ``score`` with the candidate's weights set (the objective on a
            subset of the search data, or :class:`GroupGramProxy`); with ``top_k > 0`` only the identity and
            the ``top_k`` best candidates by ``rank`` are then scored with ``score``.
        top_k: candidates scored exactly after ranking; 0 scores every candidate (exhaustive).
    """
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0: score every candidate)")
    mask = list(quantize_mask) if quantize_mask is not None else [True] * len(linears)
    widths = [bits] * len(linears) if isinstance(bits, int) else list(bits)
    originals = [lin.weight.detach().clone() for lin in linears]  # explicit copies: .cpu() would alias
    q_linears = [lin for lin, m in zip(linears, mask, strict=True) if m]
    w_mean = weight_mean([lin.weight for lin in q_linears], group_size) if q_linears and mode != "x" else None
    if heads is not None:
        x_mean = reduce_heads(x_mean.float(), *heads)
        w_mean = reduce_heads(w_mean, *heads) if w_mean is not None else None
    candidates = candidate_scales(x_mean, w_mean, n_grid, mode)
    grid = [expand_heads(c.scales, *heads) if heads is not None else c.scales for c in candidates]
    grid = [s.to(originals[0].device) for s in grid]

    proxy: list[float] = []
    if rank is not None:
        for s in grid:
            _set_candidate(linears, originals, mask, s, widths, group_size, zero_point)
            proxy.append(rank())
    if rank is not None and 0 < top_k < len(grid) - 1:
        order = sorted((i for i in range(1, len(grid)) if math.isfinite(proxy[i])), key=lambda i: (proxy[i], i))
        to_score = [0, *sorted(order[:top_k])]
    else:
        to_score = list(range(len(grid)))
    scored: dict[int, float] = {}
    for i in to_score:
        _set_candidate(linears, originals, mask, grid[i], widths, group_size, zero_point)
        scored[i] = score()
    for lin, orig in zip(linears, originals, strict=True):
        lin.weight.copy_(orig)
    losses: list[float | None] = [scored.get(i) for i in range(len(grid))]  # None: not scored

    loss_identity = scored[0]  # the identity (index 0) is always scored
    finite = [i for i in to_score if math.isfinite(scored[i])]
    if not finite:
        logger.warning("scale search: no candidate gave a finite loss; using identity scales")
        return ScaleSearchResult(
            torch.ones_like(x_mean.float()),
            "x",
            0.0,
            loss_identity,
            loss_identity,
            len(candidates),
            fallback=True,
            losses=losses,
            proxy_losses=proxy,
        )
    best = min(finite, key=lambda i: (scored[i], i))
    cand = candidates[best]
    return ScaleSearchResult(
        cand.scales.detach().cpu().clone(),
        cand.mode,
        cand.alpha,
        loss_identity,
        scored[best],
        len(candidates),
        losses=losses,
        proxy_losses=proxy,
        chosen=best,
    )
