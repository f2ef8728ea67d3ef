"""Capture what the decoder layers receive: layer-0 hidden states and every layer's keyword arguments.

No "catcher" that raises to stop the forward pass. Two hook-based passes over the backbone
(``model.base_model``, so the LM head never runs):

1. kwargs pass: forward pre-hooks (``with_kwargs=True``) on *every* layer record the keyword
   arguments each layer is called with (attention mask, position embeddings, cache position ...), once
   per distinct batch size. Layers may differ (Gemma3 alternates sliding-window and global attention).
   These arguments depend only on the batch shape, not on the token values.
2. inputs pass: the layer list is temporarily cut to layer 0 and a pre-hook records the hidden
   states that enter it, for every calibration batch.

Floating tensors are returned as float32 (the compute dtype); everything stays on the model's device.
"""

from __future__ import annotations

from collections.abc import Callable
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


def take_rows(obj: Any, batch: int, rows: int) -> Any:
    """The first ``rows`` entries of a cached batch of ``batch`` sequences: every tensor of at least two
    dimensions whose first is ``batch`` (hidden states, position embeddings, masks, position ids) is cut to
    ``rows``; the rest (cache positions, flags) is kept as it is."""
    return map_tensors(obj, lambda t: t[:rows] if t.dim() >= 2 and t.shape[0] == batch else t)


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
    model: nn.Module, layers: nn.ModuleList, input_ids: Tensor, batch_size: int
) -> LayerInputs:
    """Record layer-0 inputs and per-layer kwargs for ``input_ids`` ``[N, L]`` cut in batches."""
    backbone = model.base_model
    device = next(model.parameters()).device
    batches = [input_ids[i:i + batch_size] for i in range(0, input_ids.shape[0], batch_size)]
    kwargs: dict[int, dict[int, dict[str, Any]]] = {i: {} for i in range(len(layers))}

    # [STEP 1] kwargs of every layer, once per distinct batch size
    for bsz in sorted({b.shape[0] for b in batches}):
        handles = []
        for idx, layer in enumerate(layers):
            def record(_mod: nn.Module, _args: tuple, kw: dict, idx: int = idx, bsz: int = bsz) -> None:
                kwargs[idx][bsz] = map_tensors(_clean(kw), lambda t: t.detach())
            handles.append(layer.register_forward_pre_hook(record, with_kwargs=True))
        try:
            backbone(input_ids=input_ids[:bsz].to(device), use_cache=False)
        finally:
            for h in handles:
                h.remove()

    # [STEP 2] layer-0 hidden states for every batch, with the layer list cut to layer 0
    hidden: list[Tensor] = []

    def grab(_mod: nn.Module, args: tuple, kw: dict) -> None:
        h = args[0] if args else kw["hidden_states"]
        hidden.append(h.detach().float())

    parent_name, _, attr = _layers_attr(backbone, layers)
    parent = backbone.get_submodule(parent_name) if parent_name else backbone
    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    setattr(parent, attr, nn.ModuleList([layers[0]]))
    try:
        for b in batches:
            backbone(input_ids=b.to(device), use_cache=False)
    finally:
        setattr(parent, attr, layers)
        handle.remove()
    return LayerInputs(hidden, kwargs)


def _layers_attr(backbone: nn.Module, layers: nn.ModuleList) -> tuple[str, str, str]:
    """Locate ``layers`` inside ``backbone``: (parent path, '.', attribute name)."""
    for name, mod in backbone.named_modules():
        if mod is layers:
            return name.rpartition(".")
    raise ValueError("the decoder layers are not inside model.base_model; check the ArchSpec layers path")
