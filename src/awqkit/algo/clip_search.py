"""Weight-clipping search for one linear (the paper's §3.3 clipping; llm-awq ``auto_clip``).

Objective, per output row ``o`` and input group ``G``, on calibration tokens ``x_t``::

    E(o, G; r) = mean_t ( Σ_{k∈G} x_t[k] · (Q(clamp(w[o], r·min_G, r·max_G))[k] − w[o, k]) )²
               = Δ[o, G]ᵀ · C_G · Δ[o, G] / n_tokens,      C_G = Σ_t x_t[G] x_t[G]ᵀ  (g × g)

so only the diagonal g × g blocks of the input's Gram matrix are needed (:func:`group_gram`): the
pipeline accumulates them over every calibration token, at a cost independent of the token count.

Grid: shrink factors r_i = 1 − i / n_grid for i = 0 .. floor(max_shrink · n_grid) (1.0 down to
1 − max_shrink, 0.5 by default); r = 1 is "no clipping", so the chosen bounds never score worse.
Both ends of each group's range shrink together; with ``independent=True`` two more passes follow
(coordinate descent over the same grid): the min end alone with the max end fixed at its best, then
the max end alone — the asymmetric quantizer can use a range that is not a scaled copy of [min, max].
Rows are processed in chunks to bound memory.

:func:`group_gram` and :func:`sample_tokens` (the statistics the pipeline accumulates) live in
:mod:`awqkit.calib.stats` and are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from awqkit.calib.stats import group_gram, sample_tokens  # noqa: F401 - re-exported (module docstring)
from awqkit.quant.primitives import fake_quantize, resolve_group_size


@dataclass
class ClipSearchResult:
    min_val: Tensor  # [out, n_groups] float32
    max_val: Tensor  # [out, n_groups] float32
    err_before: float  # mean group output error with r = 1
    err_after: float  # with the chosen bounds
    mean_ratio: float  # mean chosen shrink factor (mean of both ends')


@torch.no_grad()
def search_clip(
    w: Tensor,
    x: Tensor | None = None,
    *,
    gram: Tensor | None = None,
    n_tokens: int | None = None,
    bits: int,
    group_size: int,
    zero_point: bool,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    independent: bool = False,
    rows_per_chunk: int = 256,
) -> ClipSearchResult:
    """Best per-(row, group) clipping bounds for ``w`` ``[out, in]``.

    The input is given either as tokens ``x`` ``[n, in]`` or as their diagonal Gram blocks ``gram``
    ``[G, g, g]`` (:func:`group_gram`) with the number of tokens ``n_tokens``; both give the same errors.
    """
    both_or_neither = "search_clip: pass the input as tokens x or as gram (+ n_tokens), not both or neither"
    if x is not None:
        if gram is not None:
            raise ValueError(both_or_neither)
        if w.dim() != 2 or x.dim() != 2 or x.shape[1] != w.shape[1]:
            raise ValueError(f"search_clip: w {tuple(w.shape)} and x {tuple(x.shape)} do not fit ([out,in], [n,in])")
        gram, n_tokens = group_gram(x, group_size), x.shape[0]
    elif gram is None:
        raise ValueError(both_or_neither)
    elif w.dim() != 2:
        raise ValueError(f"search_clip: w {tuple(w.shape)} and gram {tuple(gram.shape)} do not fit ([out,in], [n,in])")
    out_f, in_f = w.shape
    g = resolve_group_size(in_f, group_size)
    n_groups = in_f // g
    if gram.shape != (n_groups, g, g) or not n_tokens:
        raise ValueError(
            f"search_clip: w {tuple(w.shape)} and gram {tuple(gram.shape)} (n_tokens={n_tokens}) "
            f"do not fit ([out, in], [in/g, g, g] with g={group_size})"
        )
    cg = gram.to(w.device, torch.float32)
    ratios = [1 - i / n_grid for i in range(int(max_shrink * n_grid) + 1)]
    mins, maxs, before, after, chosen = [], [], 0.0, 0.0, 0.0
    for start in range(0, out_f, rows_per_chunk):
        wc = w[start : start + rows_per_chunk].float()
        rows = wc.shape[0]
        wg = wc.reshape(rows, n_groups, g)
        org_min, org_max = wg.amin(dim=-1), wg.amax(dim=-1)  # [r, G]

        def error(lo: Tensor, hi: Tensor, wg: Tensor = wg, rows: int = rows) -> Tensor:
            wq = fake_quantize(
                torch.clamp(wg, lo.unsqueeze(-1), hi.unsqueeze(-1)).reshape(rows, in_f),
                bits,
                group_size,
                zero_point,
                inplace=True,
            ).reshape(rows, n_groups, g)
            d = (wq - wg).transpose(0, 1)  # [G, r, g]
            return (torch.bmm(d, cg) * d).sum(-1).T.clamp(min=0) / n_tokens  # [r, G]

        best_err = error(org_min, org_max)
        before += best_err.sum().item()
        best_min, best_max = org_min.clone(), org_max.clone()
        best_lo_r, best_hi_r = torch.ones(rows, n_groups), torch.ones(rows, n_groups)
        # joint pass: both ends shrink by r; then, if asked, each end alone with the other fixed
        passes = [("both", ratios[1:])] + ([("min", ratios), ("max", ratios)] if independent else [])
        for which, grid in passes:
            fixed_min, fixed_max = best_min.clone(), best_max.clone()
            for r in grid:
                lo = org_min * r if which != "max" else fixed_min
                hi = org_max * r if which != "min" else fixed_max
                err = error(lo, hi)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_min = torch.where(better, lo, best_min)
                best_max = torch.where(better, hi, best_max)
                if which != "max":
                    best_lo_r = torch.where(better, torch.full_like(best_lo_r, r), best_lo_r)
                if which != "min":
                    best_hi_r = torch.where(better, torch.full_like(best_hi_r, r), best_hi_r)
        mins.append(best_min)
        maxs.append(best_max)
        after += best_err.sum().item()
        chosen += (best_lo_r + best_hi_r).sum().item() / 2
    n = out_f * n_groups
    return ClipSearchResult(torch.cat(mins), torch.cat(maxs), before / n, after / n, chosen / n)
