"""What the pipeline records about a decoder layer's inputs during its float pass (:class:`LayerStats`), and the
statistics functions it uses: per-group Gram blocks of an input (:func:`group_gram`) and evenly strided token
samples (:func:`sample_tokens`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from awqkit.calib.capture import map_tensors
from awqkit.parallel import SINGLE, DataParallel
from awqkit.quant.primitives import resolve_group_size

TOKEN_CHUNK = 2048  # tokens per batch of a position-wise scoring module's merged sample


def group_gram(x: Tensor, group_size: int) -> Tensor:
    """Diagonal Gram blocks ``[G, g, g]`` (float64) of tokens ``x`` ``[..., in]``: ``C_G = Σ_t x_t[G] x_t[G]ᵀ``."""
    flat = x.reshape(-1, x.shape[-1]).float()
    g = resolve_group_size(flat.shape[1], group_size)
    xg = flat.reshape(flat.shape[0], -1, g).transpose(0, 1)  # [G, t, g]
    return torch.bmm(xg.transpose(1, 2), xg).double()


def sample_tokens(x: Tensor, n_tokens: int) -> Tensor:
    """Evenly strided sample of at most ``n_tokens`` rows of ``x`` ``[..., in]`` → ``[n, in]`` float32."""
    flat = x.reshape(-1, x.shape[-1]).float()
    step = max(1, flat.shape[0] // n_tokens)
    return flat[::step][:n_tokens]


class LayerStats:
    """Hooks for one decoder layer's float pass, and what they accumulate.

    Always: per-linear sum of |x| (fp64) and token counts, and a token sample of each linear's input for
    the clip search (search batches only). Per mapping, by its scoring kind: the scoring module's
    (args, kwargs) for the search batches ("sequence"), a token sample of its input from every batch
    ("tokens"), or the Gram matrix of its linear's input over every token ("linear").
    """

    def __init__(
        self,
        linears: dict[str, nn.Linear],
        mappings: list,
        tokens_per_batch: int,
        clip_groups: dict[str, int],
        clip_tokens: int,
        proxy_groups: dict[str, int] | None = None,
        linear_tokens: set[str] | None = None,
    ) -> None:
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
        # "linear" mappings whose input has fewer calibration tokens than channels keep the tokens [n, in]
        # instead of the Gram matrix (TokenScorer: the cheaper form of the same objective)
        self.tokens: dict[str, list[Tensor]] = {}
        self.token_batches: dict[str, list[int]] = {}
        self._tokenwise: dict[int, bool] = {}
        self.caching = False
        self.batch = 0  # the global index of the calibration batch being run (set by the pipeline)
        self.input_batches: dict[int, list[int]] = {}  # the global batch of each entry of inputs[k]
        self.clip_batches: dict[str, list[int]] = {n: [] for n in clip_groups}
        self.clip_tokens = clip_tokens
        self.tokens_per_batch = tokens_per_batch
        self.handles = []
        for k, m in enumerate(mappings):
            if m.mapping.scoring == "linear" and m.mapping.inspect in (linear_tokens or ()):
                self.tokens[m.mapping.inspect] = []
                self.token_batches[m.mapping.inspect] = []
            elif m.mapping.scoring == "linear":
                lin = m.linears[0]
                self.gram[m.mapping.inspect] = torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64)
            else:
                self.inputs[k] = []
                self.input_batches[k] = []
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
            if name in self.tokens:
                self.tokens[name].append(flat.float().cpu())
                self.token_batches[name].append(self.batch)
            if name in self.proxy_groups:
                block = self._blocks(args[0], flat, self.proxy_groups[name])
                self.proxy_gram[name] = self.proxy_gram.get(name, 0) + block
            if name in self.clip_gram_groups:
                if name in self.gram or name in self.tokens:
                    return  # finish() takes its clip blocks from the full Gram's diagonal or the tokens
                block = self._blocks(args[0], flat, self.clip_gram_groups[name])
                self.clip_gram[name] = self.clip_gram.get(name, 0) + block
            elif self.caching and name in self.clip_x:
                self.clip_x[name].append(sample_tokens(x, self.clip_tokens).cpu())
                self.clip_batches[name].append(self.batch)

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
                self.input_batches[idx].append(self.batch)
            elif self.caching:
                self.inputs[idx].append(map_tensors((args, kwargs), lambda t: t.detach()))
                self.input_batches[idx].append(self.batch)

        return hook

    def finish(self, parallel: DataParallel = SINGLE, device: torch.device | str = "cpu") -> None:
        """Merge per-batch token samples and cut them into batches of ``TOKEN_CHUNK`` tokens (a few large
        matmuls beat many small ones; one batch of all tokens would hold every intermediate activation of the
        scoring module at once: 4 x 8192 x 14336 floats, 1.9 GB, for a Llama-3-8B MLP); take the clip Gram
        blocks of linears that accumulate a full input Gram from its diagonal.

        Under data parallelism (:mod:`awqkit.parallel`) the sums are all-reduced first and the token samples
        gathered in global batch order, so every rank holds what a single process would; the cached inputs of
        modules that mix positions stay on their rank (their losses are all-reduced by the scorer). The merged
        samples are then moved to ``device`` once (they are scored once per grid candidate)."""
        if parallel.active:
            self._reduce(parallel)
        for name in list(self.tokens):
            self.tokens[name] = [torch.cat(self.tokens[name])] if self.tokens[name] else []
        for name, g in self.clip_gram_groups.items():
            if name in self.tokens:
                self.clip_gram[name] = group_gram(self.tokens[name][0], g)
            elif name in self.gram:
                full = self.gram[name]
                self.clip_gram[name] = torch.stack([full[i : i + g, i : i + g] for i in range(0, full.shape[0], g)])
        for k, items in self.inputs.items():
            if self._tokenwise.get(k) and items:
                x = torch.cat([a[0] for a, _ in items], dim=1)
                rest, kw = tuple(items[0][0][1:]), items[0][1]
                self.inputs[k] = [((c.to(device),) + rest, kw) for c in x.split(TOKEN_CHUNK, dim=1)]

    def _reduce(self, par: DataParallel) -> None:
        names = sorted(self.count)
        counts = par.sum_floats([float(self.count[n]) for n in names])
        self.count = {n: int(c) for n, c in zip(names, counts, strict=True)}
        for table in (self.abs_sum, self.gram, self.proxy_gram, self.clip_gram):
            for n in sorted(table):
                table[n] = par.all_reduce(table[n])
        for n in sorted(self.clip_x):
            self.clip_batches[n], self.clip_x[n] = par.gather_in_batch_order(self.clip_batches[n], self.clip_x[n])
        for n in sorted(self.tokens):
            self.token_batches[n], self.tokens[n] = par.gather_in_batch_order(self.token_batches[n], self.tokens[n])
        for k in sorted(self.inputs):
            if self._tokenwise.get(k):
                self.input_batches[k], self.inputs[k] = par.gather_in_batch_order(self.input_batches[k], self.inputs[k])

    def x_mean(self, name: str) -> Tensor:
        return (self.abs_sum[name] / max(self.count[name], 1)).float()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self._last_block = None


__all__ = ["TOKEN_CHUNK", "LayerStats", "group_gram", "sample_tokens"]
