"""Orchestration only: the layer-by-layer AWQ loop. The math lives in ``algo/`` and ``quant/``.

For each decoder layer, with only that layer on the compute device, in float32:

1. one float forward over all calibration batches, with hooks that accumulate every linear's
   per-input-channel mean |x| (fp32) and cache, for the first ``search_samples`` blocks, the inputs of
   each mapping's scoring module and a token sample of each linear's input;
2. per mapping, in forward order: scale search, then fold 1/s into the previous op and s into the
   linears (the float output is unchanged);
3. per linear (except q/k): clip search on its — now scaled — inputs, then clamp; then, with
   ``SearchConfig.rounding``, each linear's integers chosen by GPTQ or AdaRound (:mod:`awqkit.rounding`), or
   every linear's integers and clipping range learned against the float layer's output (:mod:`awqkit.refine`);
4. the next layer's inputs: outputs of this layer with its linears fake-quantized
   (``propagate="quantized"``, the default, like llm-compressor) or of the float layer
   (``"float"``, like llm-awq/AutoAWQ).

The model's weights end folded and clipped but still float; :func:`awqkit.quantize_model.pack`
(nn/replace) quantizes and packs them. Everything decided is recorded in :class:`AWQResults`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from awqkit.algo.clip_search import search_clip
from awqkit.algo.fold import apply_clip, expand_heads, fold_scales
from awqkit.algo.results import AWQResults, ClipEntry, NormEntry, ScaleEntry
from awqkit.algo.scale_search import (
    GramScorer,
    GroupGramProxy,
    ModuleScorer,
    TokenScorer,
    search_scales,
)
from awqkit.arch import (
    ArchSpec,
    get_layers,
    layer_linears,
    resolve_arch,
    resolve_mappings,
)
from awqkit.calib.capture import (
    LayerInputs,
    capture_layer_inputs,
    take_rows,
    to_compute,
)
from awqkit.calib.stats import LayerStats
from awqkit.config import QuantConfig, SearchConfig
from awqkit.parallel import SINGLE, DataParallel
from awqkit.quant.primitives import fake_quantize, resolve_group_size
from awqkit.refine import LayerForward, refine_layer
from awqkit.rounding import round_layer

logger = logging.getLogger(__name__)


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _module_scorer(
    module: nn.Module, cached: list[tuple[tuple, dict]], device: torch.device | str, parallel: DataParallel = SINGLE
) -> ModuleScorer:
    """Scores ``module`` with its current weights on the cached (args, kwargs) batches, against its output now;
    the losses are summed over the data-parallel ranks (each holding its own batches)."""

    def forward(b: int) -> Tensor:
        args, kw = to_compute(cached[b], device)
        return _first(module(*args, **kw))

    return ModuleScorer(forward, len(cached), reduce=parallel.sum_floats if parallel.active else None)


def _rank_subset(
    cached: list[tuple[tuple, dict]], tokenwise: bool, n_tokens: int, batches: list[int], shapes: list[tuple[int, int]]
) -> list[tuple[tuple, dict]]:
    """The part of a mapping's cached search inputs the ranking pass scores: ``n_tokens`` tokens evenly strided
    over the merged token sample's chunks (position-wise modules), or the first whole sequences holding at least
    ``n_tokens`` tokens (modules that mix positions). For the latter ``cached`` holds this rank's batches,
    ``batches`` their global indices and ``shapes`` every global batch's ``(rows, length)``: the sequences
    chosen are those a single process would choose, each taken by the rank holding it."""
    if tokenwise:
        (_, *rest), kw = cached[0]
        chunks = [args[0] for args, _ in cached]
        total = sum(c.shape[1] for c in chunks)
        step = max(1, total // n_tokens)
        picked, start = [], 0  # global positions 0, step, 2*step, ... taken chunk by chunk without a merged copy
        for c in chunks:
            first = (-start) % step
            picked.append(c[:, first::step])
            start += c.shape[1]
        return [((torch.cat(picked, dim=1)[:, :n_tokens], *rest), kw)]
    local = dict(zip(batches, cached, strict=True))
    out: list[tuple[tuple, dict]] = []
    left = n_tokens
    for g, (b, length) in enumerate(shapes):
        rows = min(b, max(1, math.ceil(left / length)))
        if g in local:
            out.append(take_rows(local[g], b, rows) if rows < b else local[g])
        left -= rows * length
        if left <= 0:
            break
    return out


def _search_tokens(run: _Run, cached: list[tuple[tuple, dict]], tokenwise: bool) -> int:
    """Tokens a mapping's full objective is scored on (over all ranks)."""
    if tokenwise:  # the merged sample, the same on every rank
        return sum(args[0].shape[1] for args, _ in cached)
    return sum(rows * length for rows, length in run.batch_shapes[: run.n_search_batches])


def _shared_input(m: Any, prefix: str, targets: set[str]) -> str:
    """The first quantized linear of mapping ``m`` (layer-relative name): where its shared input is hooked."""
    return next(n for n in m.mapping.linears if prefix + n in targets)


def _fake_quantize_linears(
    linears: dict[str, nn.Linear], qcfg: QuantConfig, rounded: dict[str, Tensor] | None = None, prefix: str = ""
) -> dict[str, Tensor]:
    """Replace weights by their fake-quantized values, each at the width of its full name ``prefix + name`` (for the
    linears in ``rounded``: the dequantized integers a rounding method chose); return the float originals (copies)."""
    saved = {}
    for name, lin in linears.items():
        saved[name] = lin.weight.detach().clone()
        if rounded is not None and name in rounded:
            lin.weight.data.copy_(rounded[name].to(lin.weight.device))
        else:
            bits = qcfg.bits_for(prefix + name)
            lin.weight.data.copy_(fake_quantize(lin.weight.data, bits, qcfg.group_size, qcfg.zero_point))
    return saved


class LayerHooks(Protocol):
    """What :func:`run_awq` calls around each decoder layer (streaming and resumable runs, :mod:`awqkit.api`).

    ``load(i, layer)`` before layer ``i`` is processed (e.g. read its weights from the source's shards);
    ``finish(i, layer, results, hidden)`` once it is folded and clipped and back on CPU in its stored dtype, with
    every result so far and the next layer's inputs (e.g. pack and write it, record progress, free it).
    """

    def load(self, index: int, layer: nn.Module) -> None: ...

    def finish(self, index: int, layer: nn.Module, results: AWQResults, hidden: list[Tensor]) -> None: ...


@dataclass
class _Run:
    """What every layer of one :func:`run_awq` call shares."""

    spec: ArchSpec
    qcfg: QuantConfig
    scfg: SearchConfig
    targets: set[str]
    inputs: LayerInputs
    device: torch.device | str
    n_search_batches: int
    clip_per_batch: int
    tokens_per_batch: int
    parallel: DataParallel
    batch_ids: list[int]  # the global index of each batch of inputs.hidden (all of them in a single process)
    batch_shapes: list[tuple[int, int]]  # (rows, length) of every global batch
    float_hidden: list[Tensor] | None = None  # this layer's inputs in the float model (refine_target="model")

    @property
    def n_tokens(self) -> int:
        """Calibration tokens over all batches (and ranks)."""
        return sum(rows * length for rows, length in self.batch_shapes)


@torch.no_grad()
def run_awq(
    model: nn.Module,
    input_ids: Tensor,
    qcfg: QuantConfig,
    scfg: SearchConfig,
    targets: set[str],
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    hooks: LayerHooks | None = None,
    start: int = 0,
    hidden: list[Tensor] | None = None,
    results: AWQResults | None = None,
    parallel: DataParallel = SINGLE,
) -> AWQResults:
    """Search and apply AWQ scales and clips, layer by layer, in place on ``model``'s float weights.

    Args:
        model: a float causal LM whose architecture ``resolve_arch`` knows, on CPU; with ``hooks`` its decoder
            layers may be on the meta device until ``hooks.load`` fills them (the embeddings and final norm
            must be real: they run to capture the first layer's inputs).
        input_ids: ``[N, L]`` calibration blocks.
        targets: full names of the linears that will be quantized (others stay float and are
            neither scaled nor clipped as quantization targets).
        device: compute device for the current layer.
        hooks: called around every layer (:class:`LayerHooks`).
        start, hidden, results: resume at layer ``start`` with its inputs ``hidden`` (one tensor per batch of
            ``scfg.batch_size`` blocks, as ``hooks.finish`` received them) and the results of layers before it.
        parallel: this process's data-parallel rank (:mod:`awqkit.parallel`): it runs the global batches
            ``b`` with ``b % world == rank``; every rank returns the same results.
    """
    spec: ArchSpec = resolve_arch(model)
    layers = get_layers(model, spec)
    results = results if results is not None else AWQResults(norm_offset=spec.norm_offset)
    bs = scfg.batch_size
    n_blocks, seq_len = input_ids.shape
    n_batches = math.ceil(n_blocks / bs)
    mine = parallel.batches(n_batches)
    if not mine:
        raise ValueError(
            f"{n_blocks} calibration blocks in batches of {bs} make {n_batches} batch(es), fewer than "
            f"the {parallel.world} data-parallel ranks: use more --n-samples or a smaller --batch-size"
        )
    n_search_batches = max(1, math.ceil(min(scfg.search_samples, n_blocks) / bs))
    logger.info(
        "capturing layer inputs for %d blocks of %d tokens%s",
        n_blocks,
        seq_len,
        f" ({len(mine)} of {n_batches} batches on rank {parallel.rank})" if parallel.active else "",
    )
    inputs: LayerInputs = capture_layer_inputs(model, layers, input_ids, bs, select=mine)
    # the float model's own activations, when the refinement targets them (they start equal: layer 0's inputs)
    streams = 2 if scfg.rounding == "refine" and scfg.refine_target == "model" and scfg.propagate == "quantized" else 1
    float_hidden = list(inputs.hidden) if streams == 2 else None
    if start:
        if hidden is None or len(hidden) != streams * len(inputs.hidden):
            raise ValueError(f"resuming at layer {start} needs its inputs: {streams * len(inputs.hidden)} batches")
        n = len(inputs.hidden)
        inputs.hidden, float_hidden = hidden[:n], (hidden[n:] if streams == 2 else None)
    run = _Run(
        spec,
        qcfg,
        scfg,
        targets,
        inputs,
        device,
        n_search_batches,
        math.ceil(scfg.clip_n_tokens / n_search_batches),
        math.ceil(scfg.search_tokens / n_batches),
        parallel,
        mine,
        [(min(bs, n_blocks - b * bs), seq_len) for b in range(n_batches)],
        float_hidden,
    )
    hidden = inputs.hidden
    for i in tqdm(range(start, len(layers)), desc="AWQ layers", disable=not progress, initial=start, total=len(layers)):
        t0 = time.perf_counter()
        layer = layers[i]
        if hooks is not None:
            hooks.load(i, layer)
        hidden = _layer(run, i, layer, hidden, results)
        results.layer_seconds.append(time.perf_counter() - t0)
        if hooks is not None:  # with the float stream, its batches follow the quantized stream's
            hooks.finish(i, layer, results, hidden + (run.float_hidden or []))
    return results


def _layer(run: _Run, i: int, layer: nn.Module, hidden: list[Tensor], results: AWQResults) -> list[Tensor]:
    """Search, fold and clip decoder layer ``i`` (steps 1-3 of the module docstring); returns the next layer's
    inputs (step 4). The layer ends on CPU in its stored dtype."""
    spec, qcfg, scfg, targets, inputs, device = run.spec, run.qcfg, run.scfg, run.targets, run.inputs, run.device
    prefix = f"{spec.layers}.{i}."
    store_dtype = next(layer.parameters()).dtype
    layer.to(device=device, dtype=torch.float32)
    linears = {n: m for n, m in layer_linears(layer).items() if prefix + n in targets}
    mappings = resolve_mappings(layer, spec, i, tie_heads=scfg.gqa_v_o)
    clip_groups = {
        n: resolve_group_size(lin.in_features, qcfg.group_size)
        for n, lin in linears.items()
        if scfg.clip and not re.fullmatch(spec.no_clip, n)
    }
    ranked = {
        _shared_input(m, prefix, targets): resolve_group_size(m.linears[0].in_features, qcfg.group_size)
        for m in mappings
        if scfg.rank_top_k
        and scfg.rank_by == "gram"
        and m.mapping.scoring != "linear"
        and any(prefix + n in targets for n in m.mapping.linears)
    }
    # single-linear mappings are scored from their input's Gram matrix, or from the tokens when there are fewer
    # tokens than input channels (the cheaper form of the same objective, see TokenScorer)
    linear_tokens = {
        m.mapping.inspect for m in mappings if m.mapping.scoring == "linear" and run.n_tokens < m.linears[0].in_features
    }
    cache = LayerStats(linears, mappings, run.tokens_per_batch, clip_groups, run.clip_per_batch, ranked, linear_tokens)

    # [STEP 1] float pass: statistics for all batches, caches for the search batches
    float_out: list[Tensor] = []
    for j, h in enumerate(hidden):
        cache.batch = run.batch_ids[j]
        cache.caching = cache.batch < run.n_search_batches
        out = _first(layer(h.to(device), **inputs.kwargs_for(i, h.shape[0], device)))
        if scfg.propagate == "float" or (scfg.rounding == "refine" and run.float_hidden is None):
            float_out.append(out.float().cpu())
    cache.remove()
    cache.finish(run.parallel, device)
    if run.float_hidden is not None:  # the refinement's targets: the float layer on the float model's activations
        float_out = [
            _first(layer(h.to(device), **inputs.kwargs_for(i, h.shape[0], device))).float().cpu()
            for h in run.float_hidden
        ]

    # [STEP 2] scale search + fold, mapping by mapping
    applied = _search_and_fold(run, i, mappings, cache, results) if scfg.scales else {}
    cache.inputs.clear()
    cache.gram.clear()
    cache.tokens.clear()
    # [STEP 3] clip search on the scaled inputs
    unclipped = {n: lin.weight.detach().clone() for n, lin in linears.items()} if scfg.rounding != "none" else None
    if scfg.clip:
        _clip(run, i, linears, cache, applied, results)
    del cache
    # [STEP 3b] rounding (GPTQ / AdaRound true-sequentially, or the whole layer refined) on the scaled weights
    if scfg.rounding == "refine" and unclipped is not None:
        _refine(run, i, layer, linears, unclipped, hidden, float_out, results)
        if run.float_hidden is not None:
            run.float_hidden = list(float_out)  # the next layer's inputs in the float model
        if scfg.propagate != "float":
            float_out.clear()
    elif scfg.rounding != "none":
        forward = _layer_forward(run, i, layer, hidden)
        results.roundings += round_layer(
            linears, lambda j: forward(j, None), len(hidden), i, prefix, qcfg, scfg, run.parallel, targets=unclipped
        )
    del unclipped
    # [STEP 4] inputs of the next layer
    return _next_inputs(run, i, layer, linears, hidden, float_out, store_dtype, results)


def _refine(
    run: _Run,
    i: int,
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    unclipped: dict[str, Tensor],
    hidden: list[Tensor],
    targets: list[Tensor],
    results: AWQResults,
) -> None:
    """Step 3b for ``rounding="refine"``: the layer's rounding and clipping ranges learned against ``targets``
    (:mod:`awqkit.refine`), started at round to nearest or, with ``refine_init="gptq"``, at GPTQ's integers
    (true-sequential, as ``rounding="gptq"``)."""
    scfg, prefix = run.scfg, f"{run.spec.layers}.{i}."
    forward = _layer_forward(run, i, layer, hidden)
    clipped = {n: lin.weight.detach().clone() for n, lin in linears.items()}
    bases, start = unclipped, None
    if scfg.refine_init == "gptq":
        updated: dict[str, Tensor] = {}
        entries = round_layer(
            linears,
            lambda j: forward(j, None),
            len(hidden),
            i,
            prefix,
            run.qcfg,
            dataclasses.replace(scfg, rounding="gptq"),
            run.parallel,
            targets=unclipped,
            updated=updated,
        )
        bases = {n[len(prefix) :]: w for n, w in updated.items()}
        start = {e.name[len(prefix) :]: (e.q.to(torch.int32), e.scales, e.zeros) for e in entries}
    # the norms feeding the quantized linears (the mappings' prev ops that are not linears), learned with them
    norms: dict[str, Tensor] = {}
    for m in run.spec.mappings if scfg.refine_norms > 0 else ():
        prev = layer.get_submodule(m.prev)
        if not isinstance(prev, nn.Linear) and isinstance(prev.weight, Tensor) and any(n in linears for n in m.linears):
            norms[m.prev] = prev.weight
    results.roundings += refine_layer(
        linears,
        bases,
        clipped,
        forward,
        targets,
        i,
        prefix,
        run.qcfg,
        scfg,
        run.parallel,
        start=start,
        norms=norms,
        norm_offset=run.spec.norm_offset,
    )
    results.norms += [NormEntry(i, prefix + n, w.detach().float().cpu().clone()) for n, w in norms.items()]


def _layer_forward(run: _Run, i: int, layer: nn.Module, hidden: list[Tensor]) -> LayerForward:
    """``forward(j, weights, rows)``: decoder layer ``i`` on calibration batch ``j`` (its ``rows`` slice of
    sequences, default all), with the weights of the linears named in ``weights`` (layer-relative) replaced
    (differentiably) or, with None, as they are."""

    def forward(j: int, weights: dict[str, Tensor] | None, rows: slice | None = None) -> Tensor:
        h = hidden[j].to(run.device)
        kw = run.inputs.kwargs_for(i, h.shape[0], run.device)
        if rows is not None:
            h, kw = h[rows], take_rows(kw, h.shape[0], rows)
        if weights is None:
            return _first(layer(h, **kw))
        return _first(functional_call(layer, {f"{n}.weight": w for n, w in weights.items()}, (h,), kw))

    return forward


def _search_and_fold(run: _Run, i: int, mappings: list, cache: LayerStats, results: AWQResults) -> dict[str, Tensor]:
    """Step 2: per mapping, the scale search, then folding; returns the scales each linear's input got."""
    spec, qcfg, scfg, targets, device, par = run.spec, run.qcfg, run.scfg, run.targets, run.device, run.parallel
    prefix = f"{spec.layers}.{i}."
    applied: dict[str, Tensor] = {}
    for k, m in enumerate(mappings):
        mask = [prefix + n in targets for n in m.mapping.linears]
        if not any(mask):
            continue
        tokenwise = m.mapping.scoring == "tokens"
        score: Callable[[], float]
        if m.mapping.scoring == "linear" and m.mapping.inspect in cache.tokens:
            score = TokenScorer(m.linears[0], cache.tokens[m.mapping.inspect][0].to(device))
        elif m.mapping.scoring == "linear":
            score = GramScorer(m.linears[0], cache.gram[m.mapping.inspect].to(device), cache.count[m.mapping.inspect])
        else:  # gathered token-sample chunks (the same on every rank) are shared out round robin
            cached = cache.inputs[k]
            mine = [c for j, c in enumerate(cached) if par.owns(j)] if tokenwise else cached
            score = _module_scorer(m.inspect, mine, device, par)
        # the linears share one input; only quantized ones are hooked, so read its statistics there
        x_name = _shared_input(m, prefix, targets)
        rank: Callable[[], float] | None = None
        if x_name in cache.proxy_gram:
            rank = GroupGramProxy(
                [lin for lin, q in zip(m.linears, mask, strict=True) if q],
                cache.proxy_gram.pop(x_name).to(device),
                cache.count[x_name],
            )
        elif m.mapping.scoring == "linear":
            rank = _linear_rank(run, m, cache, x_name, device)
        elif (
            scfg.rank_top_k
            and scfg.rank_by == "subset"
            and _search_tokens(run, cache.inputs[k], tokenwise) > scfg.rank_tokens
        ):
            # (a subset as large as the search data would rank by the full objective: score every candidate)
            sub = _rank_subset(cache.inputs[k], tokenwise, scfg.rank_tokens, cache.input_batches[k], run.batch_shapes)
            rank = _module_scorer(m.inspect, sub, device, SINGLE if tokenwise else par)
        res = search_scales(
            m.linears,
            score,
            cache.x_mean(x_name),
            bits=[qcfg.bits_for(prefix + n) for n in m.mapping.linears],
            group_size=qcfg.group_size,
            zero_point=qcfg.zero_point,
            n_grid=scfg.n_grid,
            mode=scfg.scale_mode,
            quantize_mask=mask,
            heads=m.heads,
            rank=rank,
            top_k=scfg.rank_top_k,
        )
        del score
        fold_scales(m.prev, m.linears, res.scales.to(device), spec.norm_offset, m.heads)
        for n in m.mapping.linears:
            applied[n] = expand_heads(res.scales, *m.heads) if m.heads else res.scales
        results.scales.append(
            ScaleEntry(
                i,
                prefix + m.mapping.prev,
                [prefix + n for n in m.mapping.linears],
                res.scales,
                res.mode,
                res.alpha,
                res.loss_identity,
                res.loss_best,
                res.fallback,
                list(m.heads) if m.heads else None,
            )
        )
    return applied


# a single linear's grid is ranked only when scoring a candidate exactly costs at least this many times more
RANK_SAVING = 4


def _linear_rank(run: _Run, m: Any, cache: LayerStats, x_name: str, device: torch.device | str) -> TokenScorer | None:
    """The ranking of a single-linear mapping: its output error on ``rank_tokens`` tokens of the linear's clip
    sample (the same objective on fewer tokens), or None where the exact score is not ``RANK_SAVING`` times dearer.

    Scoring a candidate exactly costs ``min(n_tokens, in) · in · out`` (:class:`GramScorer` or
    :class:`TokenScorer`), the ranking ``rank_tokens · in · out``: a Llama-3-8B down_proj with 65k calibration
    tokens costs 1.7 TFLOP a candidate exactly and 60 GFLOP ranked on 512 tokens. SmolLM2's (in = 1536) is not
    ranked. Without a clip sample (``clip=False``, ``clip_n_tokens=0``) every candidate is scored exactly."""
    scfg = run.scfg
    sample = cache.clip_x.get(x_name)
    if not (scfg.rank_top_k and scfg.rank_by == "subset" and sample):
        return None
    x = torch.cat(sample)  # the same on every data-parallel rank (gathered in batch order)
    x = x[:: max(1, x.shape[0] // scfg.rank_tokens)][: scfg.rank_tokens]
    if min(run.n_tokens, m.linears[0].in_features) < RANK_SAVING * x.shape[0]:
        return None
    return TokenScorer(m.linears[0], x.to(device))


def _clip(
    run: _Run, i: int, linears: dict[str, nn.Linear], cache: LayerStats, applied: dict[str, Tensor], results: AWQResults
) -> None:
    """Step 3: per clipped linear, the clip search on its scaled inputs, then clamping."""
    qcfg, scfg, device = run.qcfg, run.scfg, run.device
    prefix = f"{run.spec.layers}.{i}."
    for n, lin in linears.items():
        if not (cache.clip_x.get(n) or n in cache.clip_gram):
            continue
        if n in cache.clip_gram:  # every token: C_G of x / s is C_G / (s_G s_Gᵀ)
            gram, x = cache.clip_gram[n], None
            if n in applied:
                sg = applied[n].double().reshape(gram.shape[0], -1)
                gram = gram / (sg.unsqueeze(2) * sg.unsqueeze(1))
            clip_in: dict[str, Any] = {"gram": gram.to(device), "n_tokens": cache.count[n]}
        else:
            x = torch.cat(cache.clip_x[n]).to(device)
            clip_in = {"x": x / applied[n].to(device) if n in applied else x}
        c = search_clip(
            lin.weight,
            **clip_in,
            bits=qcfg.bits_for(prefix + n),
            group_size=qcfg.group_size,
            zero_point=qcfg.zero_point,
            n_grid=scfg.clip_n_grid,
            max_shrink=scfg.clip_max_shrink,
            independent=scfg.clip_independent,
        )
        apply_clip(lin, c.min_val, c.max_val)
        results.clips.append(
            ClipEntry(i, prefix + n, c.min_val.cpu(), c.max_val.cpu(), c.err_before, c.err_after, c.mean_ratio)
        )


def _next_inputs(
    run: _Run,
    i: int,
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    hidden: list[Tensor],
    float_out: list[Tensor],
    store_dtype: torch.dtype,
    results: AWQResults,
) -> list[Tensor]:
    """Step 4: the next layer's inputs (the float outputs, or the outputs with the linears fake-quantized);
    the layer ends on CPU in its stored dtype."""
    qcfg, scfg, inputs, device = run.qcfg, run.scfg, run.inputs, run.device
    if scfg.propagate == "float":
        hidden = float_out
    else:
        layer.to(store_dtype)  # the stored weights are what gets quantized
        layer.float()
        prefix = f"{run.spec.layers}.{i}."
        rounded = {r.name[len(prefix) :]: r.weight() for r in results.roundings if r.layer == i}
        saved = _fake_quantize_linears(linears, qcfg, rounded, prefix)
        hidden = [_first(layer(h.to(device), **inputs.kwargs_for(i, h.shape[0], device))).float().cpu() for h in hidden]
        for n, w in saved.items():
            linears[n].weight.data.copy_(w)
    layer.to(device="cpu", dtype=store_dtype)
    return hidden
