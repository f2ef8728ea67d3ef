"""Capture what the decoder layers receive: layer-0 hidden states and every layer's keyword arguments.

One pass of the backbone (``model.base_model``, so the LM head never runs) per calibration batch, in which
every decoder layer's ``forward`` is replaced, for the pass, by a recorder: it keeps the hidden states that
enter layer 0 and the keyword arguments each layer is called with (attention mask, position embeddings,
cache position ...; once per distinct batch size; layers may differ, e.g. Gemma3 alternates sliding-window
and global attention), and returns its input unchanged. No layer weight is read, so the layers may still be
on the meta device (:mod:`awqkit.io.lazy` loads them one at a time later); only the embeddings and what runs
after the last layer (the final norm) must be real. No "catcher" that raises to stop the forward pass.

Floating tensors are returned as float32 (the compute dtype); everything stays on the embeddings' device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

_DROP_KWARGS = ("past_key_values", "past_key_value", "use_cache", "output_attentions")


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside nested tuples/lists/dicts."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def to_compute(obj: Any, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Any:
    """Move tensors to ``device``; floating ones are cast to ``dtype``."""
    return map_tensors(obj, lambda t: t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device))


def take_rows(obj: Any, batch: int, rows: int | slice) -> Any:
    """The first ``rows`` entries (or the ``rows`` slice) of a cached batch of ``batch`` sequences: every tensor of
    at least two dimensions whose first is ``batch`` (hidden states, position embeddings, masks, position ids) is
    cut; the rest (cache positions, flags) is kept as it is."""
    cut = slice(0, rows) if isinstance(rows, int) else rows
    return map_tensors(obj, lambda t: t[cut] if t.dim() >= 2 and t.shape[0] == batch else t)


@dataclass
class LayerInputs:
    """hidden: per calibration batch ``[b, L, d]`` float32; kwargs[layer][batch_size] -> layer kwargs."""

    hidden: list[Tensor]
    kwargs: dict[int, dict[int, dict[str, Any]]]

    def kwargs_for(self, layer: int, batch_size: int, device: torch.device | str) -> dict[str, Any]:
        return to_compute(self.kwargs[layer][batch_size], device)


def _clean(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS and k != "hidden_states"}


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    layers: nn.ModuleList,
    input_ids: Tensor,
    batch_size: int,
    select: Sequence[int] | None = None,
) -> LayerInputs:
    """Record layer-0 inputs and per-layer kwargs for ``input_ids`` ``[N, L]`` cut in batches of ``batch_size``
    blocks; only the batches whose indices are in ``select`` (default all), in that order."""
    lm: Any = model  # a transformers causal LM; nn.Module types base_model and the like as Tensor | Module
    backbone = lm.base_model
    device = lm.get_input_embeddings().weight.device
    batches = [input_ids[i : i + batch_size] for i in range(0, input_ids.shape[0], batch_size)]
    if select is not None:
        batches = [batches[b] for b in select]
    kwargs: dict[int, dict[int, dict[str, Any]]] = {i: {} for i in range(len(layers))}
    hidden: list[Tensor] = []

    def recorder(idx: int) -> Callable[..., Tensor]:
        def forward(*args: Any, **kw: Any) -> Tensor:
            h = args[0] if args else kw["hidden_states"]
            if idx == 0:
                hidden.append(h.detach().float())
            kwargs[idx].setdefault(h.shape[0], map_tensors(_clean(kw), lambda t: t.detach()))
            return h

        return forward

    for idx, layer in enumerate(layers):
        layer.forward = recorder(idx)  # an instance attribute shadows the class's forward
    try:
        for b in batches:
            backbone(input_ids=b.to(device), use_cache=False)
    finally:
        for layer in layers:
            del layer.forward
    return LayerInputs(hidden, kwargs)
