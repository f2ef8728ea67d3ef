"""The rounding step of the layer loop: each linear's integers chosen by GPTQ or AdaRound, true-sequentially.

After the scales are folded and the clips applied (:mod:`awqkit.pipeline`, steps 2-3), a decoder layer's quantized
linears are grouped by the input they share (q/k/v, then o, then gate/up, then down in a Llama layer), in the
order the layer calls them. Group by group:

1. one pass over every calibration batch, stopped as soon as the group's input is seen, accumulates that input's
   Gram matrix ``H = Σ_t x_t x_tᵀ`` (float32 ``[in, in]``, summed over the data-parallel ranks). The groups
   before it are already rounded, so ``H`` is what the rounded layer feeds this group (true-sequential, as GPTQ
   does);
2. each linear of the group is rounded on its group grid (static: from its current, scaled and clipped weight)
   to minimise ``tr(ΔW H ΔWᵀ)``, its output error over every calibration token against its weight before the
   clipping (so the clipping error is compensated too, rather than the clipped weight reproduced): ``gptq``
   (:func:`awqkit.algo.gptq.gptq_quantize`) or ``adaround`` (:func:`awqkit.algo.adaround.adaround`); its weight
   becomes the dequantized result, and the integers are recorded (:class:`awqkit.algo.results.RoundingEntry`)
   for the packer, which stores them as they are.

Cost per layer: the group passes (each stops at its group), the Gram products (``tokens · in²`` per group) and
the rounding itself (GPTQ ``O(in³ + out · in²)``; AdaRound ``iters · out · in²``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from awqkit.algo.adaround import adaround
from awqkit.algo.gptq import gptq_quantize
from awqkit.algo.results import RoundingEntry
from awqkit.config import QuantConfig, SearchConfig
from awqkit.parallel import DataParallel
from awqkit.quant.primitives import fake_quantize

logger = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the input it needs is seen."""


def call_groups(linears: dict[str, nn.Linear], run_first_batch: Callable[[], object]) -> list[list[str]]:
    """The linears grouped by the input tensor they share, in the order the layer calls them (one forward of one
    batch: linears given the same tensor object share an input)."""
    seen: list[tuple[Tensor, str]] = []  # the inputs themselves: kept alive, no id is reused within the pass

    def hook(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def record(_: nn.Module, args: tuple[Tensor, ...]) -> None:
            seen.append((args[0], name))

        return record

    handles = [lin.register_forward_pre_hook(hook(n)) for n, lin in linears.items()]
    try:
        run_first_batch()
    finally:
        for h in handles:
            h.remove()
    groups: list[tuple[Tensor, list[str]]] = []
    placed: set[str] = set()
    for x, name in seen:
        if name in placed:
            continue
        placed.add(name)
        group = next((g for t, g in groups if t is x), None)
        if group is None:
            groups.append((x, [name]))
        else:
            group.append(name)
    seen.clear()
    missing = sorted(set(linears) - placed)
    if missing:
        raise RuntimeError(f"rounding: the layer never called {missing}; they cannot be rounded from their inputs")
    return [g for _, g in groups]


def input_gram(lin: nn.Linear, forward: Callable[[int], object], n_batches: int, parallel: DataParallel) -> Tensor:
    """``Σ_t x_t x_tᵀ`` (float32 ``[in, in]``) of ``lin``'s input over the batches ``forward(0 .. n_batches - 1)``
    runs (each forward stopped at ``lin``), summed over the data-parallel ranks."""
    gram = torch.zeros(lin.in_features, lin.in_features, dtype=torch.float32, device=lin.weight.device)

    def accumulate(_: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0].reshape(-1, lin.in_features).float()
        gram.addmm_(x.T, x)
        raise _Stop

    handle = lin.register_forward_pre_hook(accumulate)
    try:
        for j in range(n_batches):
            try:
                forward(j)
            except _Stop:
                pass
    finally:
        handle.remove()
    return parallel.all_reduce(gram)


def output_error(w: Tensor, w_hat: Tensor, h: Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)`` with ``ΔW = w - w_hat``: the summed squared output error over the calibration tokens."""
    d = (w.float() - w_hat.float()).to(h.device)
    return float(((d @ h) * d).sum())


def round_linear(
    name: str,
    lin: nn.Linear,
    h: Tensor,
    layer: int,
    qcfg: QuantConfig,
    scfg: SearchConfig,
    target: Tensor | None = None,
    updated: dict[str, Tensor] | None = None,
) -> RoundingEntry:
    """Round ``lin`` with ``scfg.rounding`` against Gram ``h``; its weight becomes the dequantized result.

    The grid comes from ``lin``'s current weight (clipped by the clip search, if it ran); the output error is
    measured against ``target`` (the weight before clipping; default the current weight), so the rounding also
    compensates the clipping error instead of reproducing the clipped weight. ``loss_rtn`` is round-to-nearest of
    the current weight against the same target (what AWQ alone would store). ``updated`` (GPTQ only) receives
    GPTQ's error-compensated columns under ``name`` (:attr:`awqkit.algo.gptq.GPTQResult.updated`)."""
    grid = lin.weight.data.float()
    w = grid if target is None else target.to(grid.device, torch.float32)
    bits, g, zp = qcfg.bits_for(name), qcfg.group_size, qcfg.zero_point
    if scfg.rounding == "gptq":
        r = gptq_quantize(w, h, bits, g, zp, damp=scfg.gptq_damp, act_order=scfg.gptq_act_order, grid_weight=grid)
        q, scales, zeros, weight = r.q, r.scales, r.zeros, r.weight
        if updated is not None and r.updated is not None:
            updated[name] = r.updated
    elif scfg.rounding == "adaround":
        a = adaround(w, h, bits, g, zp, iters=scfg.rounding_iters, grid_weight=grid)
        q, scales, zeros, weight = a.q, a.scales, a.zeros, a.weight
    else:
        raise ValueError(f"rounding={scfg.rounding!r} is not a rounding method (gptq, adaround)")
    loss_rtn = output_error(w, fake_quantize(grid, bits, g, zp), h)
    loss = output_error(w, weight, h)
    lin.weight.data.copy_(weight.to(lin.weight.dtype))
    return RoundingEntry(
        layer, name, scfg.rounding, q.to(torch.uint8).cpu(), scales.cpu(), zeros.to(torch.int32).cpu(), loss_rtn, loss
    )


def round_layer(
    linears: dict[str, nn.Linear],
    forward: Callable[[int], object],
    n_batches: int,
    layer: int,
    prefix: str,
    qcfg: QuantConfig,
    scfg: SearchConfig,
    parallel: DataParallel,
    targets: dict[str, Tensor] | None = None,
    updated: dict[str, Tensor] | None = None,
) -> list[RoundingEntry]:
    """Round every linear of ``linears`` (layer-relative names; float32 weights on the compute device), group by
    group in call order (see the module docstring). ``forward(j)`` runs the layer on this rank's calibration batch
    ``j`` of ``n_batches``; ``targets`` holds the weights before clipping (:func:`round_linear`); ``updated``
    receives GPTQ's error-compensated columns (full names). Returns the entries (full names ``prefix + name``)."""
    groups = call_groups(linears, lambda: forward(0))
    entries = []
    for group in groups:
        h = input_gram(linears[group[0]], forward, n_batches, parallel)
        for name in group:
            target = targets.get(name) if targets is not None else None
            entry = round_linear(prefix + name, linears[name], h, layer, qcfg, scfg, target, updated)
            entries.append(entry)
            logger.debug(
                "layer %d %s: %s output error %.4g (round to nearest %.4g)",
                layer,
                name,
                scfg.rounding,
                entry.loss,
                entry.loss_rtn,
            )
        del h
    return entries


__all__ = ["call_groups", "input_gram", "output_error", "round_layer", "round_linear"]
