"""The block refinement step of the layer loop (``--method awq-refine``): AWQ's result as the starting point, then
the rounding and the clipping range of every quantized linear of a decoder layer learned together against the
float layer's output (SignRound / AutoRound's per-block objective, TesseraQ's AWQ initialisation).

After the scales are folded and the clips searched (:mod:`awqkit.pipeline`, steps 2-3), for decoder layer ``i``:

1. every quantized linear gets a :class:`awqkit.algo.refine.LearnedGrid` started at AWQ's grid (its clipped
   range, round to nearest), the weight it quantizes being the scaled weight *before* clipping;
2. objective: ``Σ_batches ||layer(X; Ŵ) - layer(X; W)||² / #elements``, the mean squared error of the layer's
   output with the learned quantized weights ``Ŵ`` on the inputs ``X`` the engine feeds the layer (the outputs
   of the already-quantized layers before it) against its targets: the float layer on the same inputs
   (``refine_target="layer"``) or the float model's activations after this layer (``"model"``);
   ``refine_batch_size`` sequences a step (each calibration batch cut in slices of that many, visited in a
   seeded random order), ``refine_iters`` steps of signed gradient descent
   (:func:`awqkit.algo.refine.signed_descent`, step ``refine_lr``, default ``1 / refine_iters``); with
   ``refine_norms > 0`` the weights of the norms feeding the linears are learned too (norm tweaking,
   :class:`awqkit.algo.refine.LearnedNorm`);
3. the objective is then measured on every calibration batch for the starting point (AWQ's round to nearest, or
   GPTQ's integers with ``refine_init="gptq"``) and for the learned integers; these are kept only when they lower
   it, so the layer never ends worse on its objective than its start. Each linear's integers are recorded
   (:class:`awqkit.algo.results.RoundingEntry`, ``method="refine"``, ``loss_rtn`` / ``loss`` the layer's
   objective before / after) for the packer, which stores them as they are.

Cost per layer: ``refine_iters`` forward and backward passes of ``refine_batch_size`` sequences, plus two forward
passes over all batches; the targets come from the pipeline's first pass (``"layer"``) or from one more float
pass over the float model's activations (``"model"``).
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
from torch import Tensor, nn

from awqkit.algo.refine import Learnable, LearnedGrid, LearnedNorm, signed_descent
from awqkit.algo.results import RoundingEntry
from awqkit.config import QuantConfig, SearchConfig
from awqkit.parallel import DataParallel
from awqkit.quant.primitives import dequantize, quantize_weight

logger = logging.getLogger(__name__)


class LayerForward(Protocol):
    """The layer's output on calibration batch ``j`` (its ``rows`` slice of sequences, default all), with the
    weights of the modules named in ``weights`` (layer-relative names of linears or norms, ``"self_attn.q_proj"``
    -> tensor) replaced, or as they are when None."""

    def __call__(self, j: int, weights: dict[str, Tensor] | None, rows: slice | None = None) -> Tensor: ...


def _objective(forward: LayerForward, targets: list[Tensor], weights: dict[str, Tensor] | None) -> tuple[float, float]:
    """``(Σ squared error, #elements)`` of the layer's outputs against ``targets`` over every batch."""
    total, count = 0.0, 0.0
    for j, y in enumerate(targets):
        out = forward(j, weights)
        total += float((out.float() - y.to(out.device)).pow(2).sum())
        count += y.numel()
    return total, count


def refine_layer(
    linears: dict[str, nn.Linear],
    bases: dict[str, Tensor],
    clipped: dict[str, Tensor],
    forward: LayerForward,
    targets: list[Tensor],
    layer: int,
    prefix: str,
    qcfg: QuantConfig,
    scfg: SearchConfig,
    parallel: DataParallel,
    start: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None,
    norms: dict[str, Tensor] | None = None,
    norm_offset: float = 0.0,
) -> list[RoundingEntry]:
    """Learn the rounding and clipping range of ``linears`` (layer-relative names; float32 weights on the compute
    device) against ``targets`` (one per calibration batch of this rank; the float layer on the same inputs, or
    the float model's activations). Each linear's grid starts at the range of its ``clipped`` weight (AWQ's clip)
    and rounds ``bases[name]``: the scaled weight before clipping (``refine_init="rtn"``: the start is round to
    nearest) or GPTQ's error-compensated columns (``"gptq"``: the start is GPTQ's integers). ``start`` holds the
    starting point's integers ``(q int32, scales, zeros)`` (default: round to nearest of ``clipped``), what the
    result is compared with. ``norms`` (layer-relative module name -> its weight, float32, with
    ``scfg.refine_norms > 0``) are learned with them (:class:`awqkit.algo.refine.LearnedNorm`) and updated in place
    when the result is kept. Returns one entry per linear (full names ``prefix + name``); the linears' weights
    become the dequantized result. See the module docstring."""
    names = sorted(linears)
    if start is None:
        start = {
            n: quantize_weight(clipped[n], qcfg.bits_for(prefix + n), qcfg.group_size, qcfg.zero_point) for n in names
        }
    grids = {
        n: LearnedGrid(
            bases[n].to(linears[n].weight.device, torch.float32),
            clipped[n].to(linears[n].weight.device, torch.float32),
            qcfg.bits_for(prefix + n),
            qcfg.group_size,
            qcfg.zero_point,
        )
        for n in names
    }
    norms = norms if scfg.refine_norms > 0 and norms else {}
    tweaks = {n: LearnedNorm(w, scfg.refine_norms, norm_offset) for n, w in norms.items()}
    learnables: list[Learnable] = [*grids.values(), *tweaks.values()]
    k = scfg.refine_batch_size  # a step's sequences: a slice of one calibration batch
    steps = [(j, slice(r, r + k)) for j, y in enumerate(targets) for r in range(0, y.shape[0], k)]

    def step_loss(m: int) -> Tensor:
        j, rows = steps[m]
        weights = {n: g.weight() for n, g in grids.items()} | {n: t.weight() for n, t in tweaks.items()}
        out = forward(j, weights, rows)
        return (out.float() - targets[j][rows].to(out.device)).pow(2).mean()

    iters = scfg.refine_iters
    lr = scfg.refine_lr if scfg.refine_lr is not None else 1.0 / max(1, iters)
    for lin in linears.values():
        lin.requires_grad_(False)
    with torch.enable_grad():
        history = signed_descent(
            learnables,
            step_loss,
            iters,
            lr,
            len(steps),
            seed=layer,
            reduce_grads=parallel.all_reduce if parallel.active else None,
        )
    with torch.no_grad():
        first = {n: dequantize(q, s, z, qcfg.group_size) for n, (q, s, z) in start.items()}
        learned = {n: g.integers() for n, g in grids.items()}
        end = {n: dequantize(q.to(torch.int32), s, z, qcfg.group_size) for n, (q, s, z) in learned.items()}
        end |= {n: t.weight() for n, t in tweaks.items()}
        before, count = parallel.sum_floats(_objective(forward, targets, first))
        after, _ = parallel.sum_floats(_objective(forward, targets, end))
    loss_start, loss_end = before / count, after / count
    kept = loss_end < loss_start
    logger.info(
        "layer %d refine: block output MSE %.4g -> %.4g over %d steps (%s; first/last step loss %.4g / %.4g)",
        layer,
        loss_start,
        loss_end,
        iters,
        "kept" if kept else "the start kept",
        history[0] if history else float("nan"),
        history[-1] if history else float("nan"),
    )
    if kept:
        for n, t in tweaks.items():
            norms[n].data.copy_(t.weight().detach().to(norms[n].dtype))
    entries = []
    for n in names:
        if kept:
            q, s, z = learned[n]
        else:
            q32, s, z = start[n]
            q = q32.to(torch.uint8)
        weight = end[n] if kept else first[n]
        linears[n].weight.data.copy_(weight.to(linears[n].weight.dtype))
        entries.append(
            RoundingEntry(layer, prefix + n, "refine", q.cpu(), s.cpu(), z.cpu(), loss_start, min(loss_end, loss_start))
        )
    return entries


__all__ = ["LayerForward", "refine_layer"]
