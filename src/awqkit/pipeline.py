"""Orchestration only: the layer-by-layer AWQ loop. The math lives in ``algo/`` and ``quant/``.

For each decoder layer, with only that layer on the compute device, in float32:

1. one float forward over all calibration batches, with hooks that accumulate every linear's
   per-input-channel mean |x| (fp32) and cache, for the first ``search_samples`` blocks, the inputs of
   each mapping's scoring module and a token sample of each linear's input;
2. per mapping, in forward order: scale search, then fold 1/s into the previous op and s into the
   linears (the float output is unchanged);
3. per linear (except q/k): clip search on its — now scaled — inputs, then clamp;
4. the next layer's inputs: outputs of this layer with its linears fake-quantized
   (``propagate="quantized"``, the default, like llm-compressor) or of the float layer
   (``"float"``, like llm-awq/AutoAWQ).

The model's weights end folded and clipped but still float; :func:`awqkit.quantize_model.pack`
(nn/replace) quantizes and packs them. Everything decided is recorded in :class:`AWQResults`.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from awqkit.algo.clip_search import group_gram, sample_tokens, search_clip
from awqkit.algo.fold import apply_clip, expand_heads, fold_scales
from awqkit.algo.results import AWQResults, ClipEntry, ScaleEntry
from awqkit.algo.scale_search import GramScorer, GroupGramProxy, ModuleScorer, search_scales
from awqkit.arch import ArchSpec, get_layers, layer_linears, resolve_arch, resolve_mappings
from awqkit.calib.capture import LayerInputs, capture_layer_inputs, map_tensors, take_rows, to_compute
from awqkit.config import QuantConfig, SearchConfig
from awqkit.quant.primitives import fake_quantize, resolve_group_size

logger = logging.getLogger(__name__)


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class _LayerCache:
    """Hooks for one layer's float pass.

    Always: per-linear sum of |x| (fp64) and token counts, and a token sample of each linear's input for
    the clip search (search batches only). Per mapping, by its scoring kind: the scoring module's
    (args, kwargs) for the search batches ("sequence"), a token sample of its input from every batch
    ("tokens"), or the Gram matrix of its linear's input over every token ("linear").
    """

    def __init__(self, linears: dict[str, nn.Linear], mappings: list, tokens_per_batch: int,
                 clip_groups: dict[str, int], clip_tokens: int, proxy_groups: dict[str, int] | None = None) -> None:
        self.abs_sum = {n: torch.zeros(lin.in_features, dtype=torch.float64) for n, lin in linears.items()}
        self.count = dict.fromkeys(linears, 0)
        # the shared input of each ranked mapping ({linear name: group size}): its diagonal Gram blocks over
        # every token, for the ranking proxy (GroupGramProxy)
        self.proxy_groups = proxy_groups or {}
        self.proxy_gram: dict[str, Tensor] = {}
        # clipped linears ({name: group size}): a token sample (clip_tokens per search batch), or with
        # clip_tokens == 0 the diagonal Gram blocks of their input over every token
        self.clip_x: dict[str, list[Tensor]] = {n: [] for n in clip_groups}
        self.clip_gram_groups = clip_groups if clip_tokens == 0 else {}
        self.clip_gram: dict[str, Tensor] = {}
        self._last_block: tuple[Tensor, int, Tensor] | None = None  # linears sharing one input reuse its blocks
        self.inputs: dict[int, list[tuple[tuple, dict]]] = {}
        self.gram: dict[str, Tensor] = {}
        self._tokenwise: dict[int, bool] = {}
        self.caching = False
        self.clip_tokens = clip_tokens
        self.tokens_per_batch = tokens_per_batch
        self.handles = []
        for k, m in enumerate(mappings):
            if m.mapping.scoring == "linear":
                lin = m.linears[0]
                self.gram[m.mapping.inspect] = torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64)
            else:
                self.inputs[k] = []
                self._tokenwise[k] = m.mapping.scoring == "tokens"
                hook = self._inspect_hook(k, self._tokenwise[k])
                self.handles.append(m.inspect.register_forward_pre_hook(hook, with_kwargs=True))
        for n, lin in linears.items():
            self.handles.append(lin.register_forward_pre_hook(self._linear_hook(n)))

    def _linear_hook(self, name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1])
            self.abs_sum[name] += flat.abs().sum(0, dtype=torch.float64).cpu()
            self.count[name] += flat.shape[0]
            if name in self.gram:
                xf = flat.float()
                self.gram[name] += (xf.T @ xf).double().cpu()
            if name in self.proxy_groups:
                block = self._blocks(args[0], flat, self.proxy_groups[name])
                self.proxy_gram[name] = self.proxy_gram.get(name, 0) + block
            if name in self.clip_gram_groups:
                if name in self.gram:
                    return None  # finish() takes its clip blocks from the full Gram's diagonal
                block = self._blocks(args[0], flat, self.clip_gram_groups[name])
                self.clip_gram[name] = self.clip_gram.get(name, 0) + block
            elif self.caching and name in self.clip_x:
                self.clip_x[name].append(sample_tokens(x, self.clip_tokens).cpu())
        return hook

    def _blocks(self, x: Tensor, flat: Tensor, g: int) -> Tensor:
        """Diagonal Gram blocks of this input; linears sharing one input object reuse them."""
        last = self._last_block
        if last is not None and last[0] is x and last[1] == g:
            return last[2]
        block = group_gram(flat, g).cpu()
        self._last_block = (x, g, block)
        return block

    def _inspect_hook(self, idx: int, tokenwise: bool) -> Callable:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            if tokenwise:
                x = sample_tokens(args[0].detach(), self.tokens_per_batch).unsqueeze(0)
                self.inputs[idx].append(((x.cpu(),) + tuple(args[1:]), kwargs))
            elif self.caching:
                self.inputs[idx].append(map_tensors((args, kwargs), lambda t: t.detach()))
        return hook

    def finish(self) -> None:
        """Merge per-batch token samples into one batch (one large matmul beats many small ones); take the
        clip Gram blocks of linears that accumulate a full input Gram from its diagonal."""
        for name, g in self.clip_gram_groups.items():
            if name in self.gram:
                full = self.gram[name]
                self.clip_gram[name] = torch.stack([full[i:i + g, i:i + g] for i in range(0, full.shape[0], g)])
        for k, items in self.inputs.items():
            if self._tokenwise.get(k) and items:
                x = torch.cat([a[0] for a, _ in items], dim=1)
                self.inputs[k] = [((x,) + tuple(items[0][0][1:]), items[0][1])]

    def x_mean(self, name: str) -> Tensor:
        return (self.abs_sum[name] / max(self.count[name], 1)).float()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self._last_block = None


def _rank_subset(cached: list[tuple[tuple, dict]], tokenwise: bool, n_tokens: int) -> list[tuple[tuple, dict]]:
    """The part of a mapping's cached search inputs the ranking pass scores: ``n_tokens`` tokens evenly strided
    from the merged token sample (position-wise modules), or the first whole sequences holding at least
    ``n_tokens`` tokens (modules that mix positions)."""
    if tokenwise:
        (x, *rest), kw = cached[0]
        step = max(1, x.shape[1] // n_tokens)
        return [((x[:, ::step][:, :n_tokens], *rest), kw)]
    out: list[tuple[tuple, dict]] = []
    left = n_tokens
    for args, kw in cached:
        hidden = args[0] if args else kw["hidden_states"]
        b, length = hidden.shape[0], hidden.shape[1]
        rows = min(b, max(1, math.ceil(left / length)))
        out.append(take_rows((args, kw), b, rows) if rows < b else (args, kw))
        left -= rows * length
        if left <= 0:
            break
    return out


def _shared_input(m: Any, prefix: str, targets: set[str]) -> str:
    """The first quantized linear of mapping ``m`` (layer-relative name): where its shared input is hooked."""
    return next(n for n in m.mapping.linears if prefix + n in targets)


def _fake_quantize_linears(linears: dict[str, nn.Linear], qcfg: QuantConfig) -> dict[str, Tensor]:
    """Replace weights by their fake-quantized values; return the float originals (copies)."""
    saved = {}
    for name, lin in linears.items():
        saved[name] = lin.weight.detach().clone()
        lin.weight.data.copy_(fake_quantize(lin.weight.data, qcfg.bits, qcfg.group_size, qcfg.zero_point))
    return saved


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
) -> AWQResults:
    """Search and apply AWQ scales and clips, layer by layer, in place on ``model``'s float weights.

    Args:
        model: a float causal LM whose architecture ``resolve_arch`` knows, on CPU.
        input_ids: ``[N, L]`` calibration blocks.
        targets: full names of the linears that will be quantized (others stay float and are
            neither scaled nor clipped as quantization targets).
        device: compute device for the current layer.
    """
    spec: ArchSpec = resolve_arch(model)
    layers = get_layers(model, spec)
    results = AWQResults(norm_offset=spec.norm_offset)
    bs = scfg.batch_size
    n_search_batches = max(1, math.ceil(min(scfg.search_samples, input_ids.shape[0]) / bs))
    logger.info("capturing layer inputs for %d blocks of %d tokens", *input_ids.shape)
    inputs: LayerInputs = capture_layer_inputs(model, layers, input_ids, bs)
    hidden = inputs.hidden
    clip_per_batch = math.ceil(scfg.clip_n_tokens / n_search_batches)
    tokens_per_batch = math.ceil(scfg.search_tokens / len(hidden))

    for i, layer in enumerate(tqdm(layers, desc="AWQ layers", disable=not progress)):
        t0 = time.perf_counter()
        prefix = f"{spec.layers}.{i}."
        store_dtype = next(layer.parameters()).dtype
        layer.to(device=device, dtype=torch.float32)
        linears = {n: m for n, m in layer_linears(layer).items() if prefix + n in targets}
        mappings = resolve_mappings(layer, spec, i, tie_heads=scfg.gqa_v_o)
        clip_groups = {n: resolve_group_size(lin.in_features, qcfg.group_size) for n, lin in linears.items()
                       if scfg.clip and not re.fullmatch(spec.no_clip, n)}
        ranked = {_shared_input(m, prefix, targets): resolve_group_size(m.linears[0].in_features, qcfg.group_size)
                  for m in mappings if scfg.rank_top_k and scfg.rank_by == "gram" and m.mapping.scoring != "linear"
                  and any(prefix + n in targets for n in m.mapping.linears)}
        cache = _LayerCache(linears, mappings, tokens_per_batch, clip_groups, clip_per_batch, ranked)

        # [STEP 1] float pass: statistics for all batches, caches for the search batches
        float_out: list[Tensor] = []
        for b, h in enumerate(hidden):
            cache.caching = b < n_search_batches
            out = _first(layer(h.to(device), **inputs.kwargs_for(i, h.shape[0], device)))
            if scfg.propagate == "float":
                float_out.append(out.float().cpu())
        cache.remove()
        cache.finish()

        # [STEP 2] scale search + fold, mapping by mapping
        applied: dict[str, Tensor] = {}
        for k, m in enumerate(mappings):
            mask = [prefix + n in targets for n in m.mapping.linears]
            if not any(mask):
                continue
            if m.mapping.scoring == "linear":
                score = GramScorer(m.linears[0], cache.gram[m.mapping.inspect].to(device), cache.count[m.mapping.inspect])
            else:
                cached = cache.inputs[k]

                def forward(b: int, mod: nn.Module = m.inspect, cached: list = cached) -> Tensor:
                    args, kw = to_compute(cached[b], device)
                    return _first(mod(*args, **kw))

                score = ModuleScorer(forward, len(cached))
            # the linears share one input; only quantized ones are hooked, so read its statistics there
            x_name = _shared_input(m, prefix, targets)
            rank = None
            if x_name in cache.proxy_gram:
                rank = GroupGramProxy([lin for lin, q in zip(m.linears, mask, strict=True) if q],
                                      cache.proxy_gram.pop(x_name).to(device), cache.count[x_name])
            elif scfg.rank_top_k and scfg.rank_by == "subset" and m.mapping.scoring != "linear":
                sub = _rank_subset(cache.inputs[k], m.mapping.scoring == "tokens", scfg.rank_tokens)

                def sub_forward(b: int, mod: nn.Module = m.inspect, cached: list = sub) -> Tensor:
                    args, kw = to_compute(cached[b], device)
                    return _first(mod(*args, **kw))

                rank = ModuleScorer(sub_forward, len(sub))
            res = search_scales(m.linears, score, cache.x_mean(x_name),
                                bits=qcfg.bits, group_size=qcfg.group_size, zero_point=qcfg.zero_point,
                                n_grid=scfg.n_grid, mode=scfg.scale_mode, quantize_mask=mask, heads=m.heads,
                                rank=rank, top_k=scfg.rank_top_k)
            del score
            fold_scales(m.prev, m.linears, res.scales.to(device), spec.norm_offset, m.heads)
            for n in m.mapping.linears:
                applied[n] = expand_heads(res.scales, *m.heads) if m.heads else res.scales
            results.scales.append(ScaleEntry(i, prefix + m.mapping.prev, [prefix + n for n in m.mapping.linears],
                                             res.scales, res.mode, res.alpha, res.loss_identity, res.loss_best,
                                             res.fallback, list(m.heads) if m.heads else None))
        cache.inputs.clear()
        cache.gram.clear()

        # [STEP 3] clip search on the scaled inputs
        if scfg.clip:
            for n, lin in linears.items():
                if not (cache.clip_x.get(n) or n in cache.clip_gram):
                    continue
                if n in cache.clip_gram:  # every token: C_G of x / s is C_G / (s_G s_Gᵀ)
                    gram, x = cache.clip_gram[n], None
                    if n in applied:
                        sg = applied[n].double().reshape(gram.shape[0], -1)
                        gram = gram / (sg.unsqueeze(2) * sg.unsqueeze(1))
                    clip_in = {"gram": gram.to(device), "n_tokens": cache.count[n]}
                else:
                    x = torch.cat(cache.clip_x[n]).to(device)
                    clip_in = {"x": x / applied[n].to(device) if n in applied else x}
                c = search_clip(lin.weight, **clip_in, bits=qcfg.bits, group_size=qcfg.group_size,
                                zero_point=qcfg.zero_point, n_grid=scfg.clip_n_grid,
                                max_shrink=scfg.clip_max_shrink, independent=scfg.clip_independent)
                apply_clip(lin, c.min_val, c.max_val)
                results.clips.append(ClipEntry(i, prefix + n, c.min_val.cpu(), c.max_val.cpu(), c.err_before,
                                               c.err_after, c.mean_ratio))
        del cache

        # [STEP 4] inputs of the next layer
        if scfg.propagate == "float":
            hidden = float_out
        else:
            layer.to(store_dtype)  # the stored weights are what gets quantized
            layer.float()
            saved = _fake_quantize_linears(linears, qcfg)
            hidden = [_first(layer(h.to(device), **inputs.kwargs_for(i, h.shape[0], device))).float().cpu()
                      for h in hidden]
            for n, w in saved.items():
                linears[n].weight.data.copy_(w)
        layer.to(device="cpu", dtype=store_dtype)
        results.layer_seconds.append(time.perf_counter() - t0)
    return results
